# Checks both set-up scripts (setup_env.sh, setup_env_oldest.sh) make before they build a venv.
# Sourced, not run: each function exits the calling script with status 2 and a message.

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
