"""Every command in the README's and docs/' shell blocks names what exists and parses as written.

Each ``bash`` block line (``\\`` continuations joined, ``# comments`` dropped, a usage synopsis's
``[optional]`` brackets opened) is checked: a ``tools/*.py`` script exists and its own
``parse_args`` accepts the arguments exactly as the page gives them (an unknown option or a wrong
choice fails here, not in a reader's terminal); a ``make`` target is in the Makefile, and
``make demo ARGS="..."`` passes the demo's parser; every ``configs/`` or ``tests/`` path exists.
Running the tools themselves is what the rest of the suite does (train, test, merge, deploy,
demo, the benchmarks' protocols); this module keeps the pages in step with those tools.
"""
import importlib.util
import os.path as osp
import re
import shlex
import sys
from typing import Dict, List, Tuple

import pytest

from .test_docs import ROOT, markdown_files

SHELL = ('bash', 'sh', 'shell', 'console')


def shell_commands(path: str) -> List[Tuple[int, str]]:
    """(line, command) of every command in the file's shell blocks, continuations joined."""
    out, block, pending, start = [], False, '', 0
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            stripped = line.strip()
            if stripped.startswith('```'):
                block = not block and stripped[3:].strip() in SHELL
                continue
            if not block:
                continue
            code = re.sub(r'(^|\s)#.*$', '', line).rstrip()  # a comment: to the line's end
            if not code.strip() and not pending:
                continue
            if not pending:
                start = lineno
            if code.endswith('\\'):
                pending += code[:-1] + ' '
                continue
            out.append((start, (pending + code).strip()))
            pending = ''
    return out


def all_commands() -> List[Tuple[str, str]]:
    return [(f'{osp.relpath(p, ROOT)}:{n}', cmd) for p in markdown_files()
            for n, cmd in shell_commands(p)]


PLACEHOLDER = re.compile(r'^(?:[A-Z][A-Z0-9_]*|my_\w+)(?:\.\w+)?$')  # CONFIG, TRAINED.pth, my_cfg.py


def words(cmd: str, tmp_dir: str) -> List[str]:
    """The command's words, a synopsis's ``[--opt VALUE]`` brackets opened and its ``...``
    dropped; a placeholder (``CONFIG``, ``TRAINED.pth``) becomes an empty file in ``tmp_dir``,
    for the tools that check a path exists while parsing."""
    out = []
    for w in shlex.split(re.sub(r'(^|\s)\[|\](?=\s|$)', r'\1', cmd)):
        if w == '...':
            continue
        if PLACEHOLDER.match(w):
            w = osp.join(tmp_dir, w)
            open(w, 'a').close()
        out.append(w)
    return out


_PARSERS: Dict[str, object] = {}


def tool_parser(script: str):
    """The ``parse_args`` of ``tools/...py``, imported from its file (its own module name)."""
    if script not in _PARSERS:
        path = osp.join(ROOT, script)
        # a tool another test imported already (registering its modules) is reused, not re-run
        module = next((m for m in list(sys.modules.values())
                       if osp.abspath(getattr(m, '__file__', None) or '') == path), None)
        if module is None:
            name = 'doc_tool_' + re.sub(r'\W', '_', script)
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        _PARSERS[script] = module.parse_args
    return _PARSERS[script]


def makefile_targets() -> List[str]:
    with open(osp.join(ROOT, 'Makefile')) as f:
        return re.findall(r'^([\w-]+):', f.read(), re.M)


COMMANDS = all_commands()


def test_the_pages_have_commands():
    assert len(COMMANDS) > 20
    assert any('tools/benchmark/speed_memory.py --ops' in c for _, c in COMMANDS)


@pytest.mark.parametrize('where,cmd', COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_names_what_exists_and_parses(where, cmd, tmp_path):
    argv = words(cmd, str(tmp_path))
    for w in argv:
        if re.match(r'(configs|tests)/\S+\.py$', w):
            assert osp.exists(osp.join(ROOT, w)), f'{where}: {w} does not exist ({cmd!r})'
    scripts = [i for i, w in enumerate(argv) if re.match(r'tools/\S+\.py$', w)]
    if scripts:
        i = scripts[0]
        script = argv[i]
        assert osp.isfile(osp.join(ROOT, script)), f'{where}: {script} does not exist'
        try:
            tool_parser(script)(argv[i + 1:])
        except SystemExit as e:
            pytest.fail(f'{where}: {script} rejects the arguments of {cmd!r} (exit {e.code})')
    elif argv[0] == 'make':
        targets = makefile_targets()
        for w in argv[1:]:
            if w.startswith('ARGS='):
                if argv[1] == 'demo':
                    try:
                        tool_parser('tools/demo.py')(words(w[len('ARGS='):], str(tmp_path)))
                    except SystemExit as e:
                        pytest.fail(f'{where}: tools/demo.py rejects {w!r} (exit {e.code})')
            else:
                assert w in targets, f'{where}: no make target {w!r} in the Makefile'


def test_a_wrong_option_is_caught():
    """The check fails on what a reader would hit: an option the tool does not have."""
    with pytest.raises(SystemExit):
        tool_parser('tools/benchmark/speed_memory.py')(['--op-profile', '5'])
    assert shell_commands.__doc__  # the extraction itself is exercised by every case above
