# What both set-up scripts (setup_env.sh, setup_env_oldest.sh) share: the checks they make before
# they build a venv (each exits the calling script with status 2 and a message), pip_run and
# build_mmcv. Sourced, not run.

# need_cxx: mmcv's CPU ops are compiled.
need_cxx() {
    command -v c++ >/dev/null 2>&1 || {
        echo "refconv_mm: a C++ compiler (c++) is needed to build mmcv's CPU ops." >&2; exit 2; }
}

# need_disk VENV OVERRIDE_VAR: a new venv takes ~6 GB (torch's CUDA runtime); stop before pip
# fills a shared disk half-way.
need_disk() {
    local venv="$1" var="$2" free_mb
    free_mb=$(df -Pk "$(dirname "$venv")" | awk 'NR==2 {print int($4 / 1024)}')
    if [[ ! -x "$venv/bin/python" ]] && (( free_mb < 6 * 1024 )); then
        echo "refconv_mm: $(dirname "$venv") has $free_mb MB free; $(basename "$venv") needs" \
            "about 6 GB (more while pip's cache is empty)." >&2
        echo "            Free some space, or set $var=/path/on/a/larger/disk/$(basename "$venv")." >&2
        exit 2
    fi
}

# pip_run CMD...: run a pip command without one line per project that a file:// extra index of the
# machine's pip.conf lacks ("WARNING: Location 'file:///...' is ignored: it is neither a file nor
# a directory.": 120 of them on the CI machines). That exact line only; every other line stays.
pip_run() {
    "$@" 2> >(grep -v "^WARNING: Location 'file://.*' is ignored: it is neither a file nor a directory\.$" >&2)
}

# build_mmcv SPEC [PIP_ARGS...]: pip-install mmcv SPEC from source with its CPU ops into the venv
# of the caller's PIP array. mmcv 2.1.0 builds with setuptools<70 while torch 2.13 wants >=77, so
# requirements/build.txt goes into a temporary directory first on the build's PYTHONPATH and PATH
# and the venv's setuptools never changes (--no-warn-conflicts: pip would compare a --target
# install with the venv's packages, which never share an environment with it; pypa/pip#7821).
build_mmcv() {
    local spec="$1" deps
    shift
    deps="$(mktemp -d)"
    trap "rm -rf '$deps'" EXIT  # the path now: the local is gone when the trap runs
    pip_run "${PIP[@]}" install -q --no-warn-conflicts --target "$deps" \
        -r "$ROOT/requirements/build.txt" "$@"
    PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}" PATH="$deps/bin:$PATH" \
        MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="$(nproc)" \
        pip_run "${PIP[@]}" install --no-build-isolation --no-deps "$spec" "$@"
    rm -rf "$deps"
    trap - EXIT
}
