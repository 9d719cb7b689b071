"""The README and docs/ pages: every relative link and #anchor resolves, and the README stays short.

Links are markdown links ``[text](target)`` and images ``![alt](target)`` outside fenced code
blocks and inline code spans. External targets (http, https, mailto) are not fetched. A target
file is resolved relative to the markdown file that links to it; an anchor (``file.md#anchor`` or
an in-page ``#anchor``) must equal the GitHub slug of a heading of the target markdown file.
"""
import os.path as osp
import re
from typing import Dict, Iterator, List, Tuple

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
README_MAX_LINES = 250

FENCE = re.compile(r'^ {0,3}(`{3,}|~{3,})')
CODE_SPAN = re.compile(r'(`+).+?\1')
# [text](target) or ![alt](target); the target ends at whitespace (an optional "title" follows)
# or at the closing parenthesis; <target> form too.
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+"[^"]*")?\s*\)')
HEADING = re.compile(r'^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$')
EXTERNAL = re.compile(r'^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)')  # http:, https:, mailto:, ...


def markdown_files() -> List[str]:
    import glob
    files = [osp.join(ROOT, 'README.md')]
    files += sorted(glob.glob(osp.join(ROOT, 'docs', '*.md')))
    return files


def prose_lines(path: str) -> Iterator[Tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    fence = None
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            m = FENCE.match(line)
            if m:
                marker = m.group(1)
                if fence is None:
                    fence = marker
                elif marker[0] == fence[0] and len(marker) >= len(fence):
                    fence = None
                continue
            if fence is None:
                yield lineno, line.rstrip('\n')


def github_slug(text: str) -> str:
    """GitHub's heading anchor: markup removed, lowercased, punctuation dropped, spaces -> '-'."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', text)  # links: keep their text
    text = re.sub(r'<[^>]+>', '', text)  # inline HTML tags
    text = text.lower()
    text = re.sub(r'[^\w\- ]', '', text)  # \w keeps letters, digits, underscore (unicode too)
    return text.replace(' ', '-')


def anchors(path: str) -> Dict[str, int]:
    """The heading anchors of a markdown file (duplicates get -1, -2, ...) -> line number."""
    out: Dict[str, int] = {}
    seen: Dict[str, int] = {}
    for lineno, line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        if slug in seen:
            seen[slug] += 1
            slug = f'{slug}-{seen[slug]}'
        else:
            seen[slug] = 0
        out[slug] = lineno
    # explicit HTML anchors (<a name="x"> / id="x") are anchors too
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            for m in re.finditer(r'<a\s+(?:name|id)="([^"]+)"', line):
                out.setdefault(m.group(1), lineno)
    return out


def links(path: str) -> Iterator[Tuple[int, str]]:
    """(line number, target) of every markdown link and image outside code."""
    for lineno, line in prose_lines(path):
        line = CODE_SPAN.sub('', line)
        for m in LINK.finditer(line):
            target = m.group(1).strip()
            if target.startswith('<') and target.endswith('>'):
                target = target[1:-1]
            yield lineno, target


def link_problems(path: str) -> List[str]:
    """One message per broken relative link or anchor of ``path``: 'file:line: link: why'."""
    problems = []
    rel = osp.relpath(path, ROOT)
    cache: Dict[str, Dict[str, int]] = {}
    for lineno, target in links(path):
        where = f'{rel}:{lineno}: ({target})'
        if not target:
            problems.append(f'{where}: empty link target')
            continue
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition('#')
        file_part = file_part.split('?', 1)[0]
        dest = osp.normpath(osp.join(osp.dirname(path), file_part)) if file_part else path
        if not osp.exists(dest):
            problems.append(f'{where}: {osp.relpath(dest, ROOT)} does not exist')
            continue
        if not anchor:
            continue
        if not dest.endswith('.md') or osp.isdir(dest):
            problems.append(f'{where}: an anchor into a file that is not markdown')
            continue
        if dest not in cache:
            cache[dest] = anchors(dest)
        if anchor not in cache[dest]:
            problems.append(f'{where}: no heading in {osp.relpath(dest, ROOT)} has the anchor '
                            f'#{anchor}')
    return problems


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: osp.relpath(p, ROOT))
def test_relative_links_and_anchors_resolve(path):
    problems = link_problems(path)
    assert not problems, 'broken links:\n' + '\n'.join(problems)


def test_docs_pages_exist_and_link_back():
    pages = [p for p in markdown_files() if osp.dirname(p) == osp.join(ROOT, 'docs')]
    assert len(pages) >= 9, [osp.relpath(p, ROOT) for p in pages]
    with open(osp.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    missing = [osp.relpath(p, ROOT) for p in pages
               if f'({osp.relpath(p, ROOT)})' not in readme]
    assert not missing, f'README.md does not link these docs pages: {missing}'
    no_back = []
    for p in pages:
        with open(p, encoding='utf-8') as f:
            head = f.read(1000)
        if '(../README.md)' not in head:
            no_back.append(osp.relpath(p, ROOT))
    assert not no_back, f'these pages do not link back to ../README.md near their top: {no_back}'


def test_readme_is_short():
    with open(osp.join(ROOT, 'README.md'), encoding='utf-8') as f:
        n = sum(1 for _ in f)
    assert n < README_MAX_LINES, f'README.md has {n} lines, must be under {README_MAX_LINES}'


@pytest.mark.parametrize('heading, slug', [
    ('Install into your environment', 'install-into-your-environment'),
    ('One line for a whole model: the `conv_cfg` route',
     'one-line-for-a-whole-model-the-conv_cfg-route'),
    ('Converged-regime study: does refocusing beat training further?',
     'converged-regime-study-does-refocusing-beat-training-further'),
    ("Known limits (not RefConv's)", 'known-limits-not-refconvs'),
    ('The pinned stack: `make env`', 'the-pinned-stack-make-env'),
    ('Classification (mmpretrain)', 'classification-mmpretrain'),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_checker_catches_broken_links(tmp_path):
    """The checker itself: a missing file, a missing anchor, duplicate headings, code ignored."""
    (tmp_path / 'other.md').write_text('# Title\n\n## Part\n\n## Part\n', encoding='utf-8')
    page = tmp_path / 'page.md'
    page.write_text(
        '# Page\n\n## A heading\n\n'
        '[ok](other.md#part-1) [ok](#a-heading) [ok](https://example.com/x#y)\n'
        '[bad file](missing.md)\n'
        '[bad anchor](other.md#part-2)\n'
        '![bad image](img.png)\n'
        '```\n[in code](nowhere.md)\n```\n'
        '`[in a code span](nowhere.md)` [bad in-page](#nope)\n', encoding='utf-8')
    global ROOT
    saved, ROOT = ROOT, str(tmp_path)
    try:
        problems = link_problems(str(page))
    finally:
        ROOT = saved
    assert len(problems) == 4, problems
    assert problems[0].startswith('page.md:6: (missing.md)')
    assert problems[1].startswith('page.md:7: (other.md#part-2)')
    assert problems[2].startswith('page.md:8: (img.png)')
    assert problems[3].startswith('page.md:12: (#nope)')
