#!/usr/bin/env bash
# Regenerates ztunnel/code-order.ld and code-order.txt, the order in which the linker
# lays out the functions that ztunnel runs, so that they share as few pages as
# possible.
#
# Why: the kernel maps a binary's code 64 KiB around each page a process touches, so
# an idle ztunnel whose start-up and idle code is spread over the whole 8 MiB of
# text has almost all of it resident (docs/benchmarks.md, "Idle memory").
#
# How: the ztunnel_e2e benchmark runs with every ztunnel under callgrind
# (AMBIT_E2E_ZTUNNEL_WRAPPER), once with state from a local file and once from
# istiod-lite (start-up, ten pods, idle), then with traffic (stream, connections,
# request/response), and once more natively under `perf record` for the CPU
# variants valgrind does not run (see below). code-order.txt lists the functions callgrind saw, in the order
# first seen (start-up first, then the data path), by their exact symbols: the
# linker's --symbol-ordering-file. Those change from build to build (the hash in a
# Rust symbol depends on the crate's version and features), so code-order.ld also
# names each as a pattern without the hash: the functions the profile saw stay
# together at the front of the code when the exact list no longer matches, and a
# function neither names keeps the linker's default place. For glibc and aws-lc's
# assembly, which have no section per function, the pattern names the archive
# member, with all its CPU variants (valgrind does not report AVX-512, so the
# variant it runs may not be the one a machine picks).
#
# Needs root (the benchmark builds network namespaces), valgrind, perf and iperf3. Takes
# about 10 minutes. Run it after changes to start-up or to the data path, and commit
# the result with the benchmark's idle figure before and after.
#
# `benches/code-order.sh DIR` keeps the profiles in DIR; run again with the same DIR,
# it reuses them and only writes the file.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
for tool in valgrind perf gcc iperf3; do
    command -v "$tool" >/dev/null || { echo "code-order: needs $tool (apt-get install -y valgrind linux-perf gcc iperf3)" >&2; exit 1; }
done
if [ $# -gt 0 ]; then
    # The profiler's command line is split at whitespace (AMBIT_E2E_ZTUNNEL_WRAPPER).
    case "$1" in *[[:space:]]*) echo "code-order: DIR must not contain whitespace" >&2; exit 1 ;; esac
    mkdir -p "$1"
    work=$(cd "$1" && pwd)
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi

profile() { # name, then the benchmark's environment
    local name=$1
    shift
    [ -d "$work/$name" ] && return
    rm -rf "$work/partial-$name"
    mkdir "$work/partial-$name"
    env AMBIT_E2E_ZTUNNEL_WRAPPER="valgrind --tool=callgrind --demangle=no --dump-instr=no --compress-strings=no --compress-pos=no --dump-every-bb=100000 --callgrind-out-file=$work/partial-$name/cg.%p" \
        "$@" cargo bench -p ambit-benches --bench ztunnel_e2e
    mv "$work/partial-$name" "$work/$name"
}
profile 1-local AMBIT_BENCH_ONLY=none
profile 2-istiod AMBIT_BENCH_CONTROL=istiod AMBIT_BENCH_ONLY=none
profile 3-traffic AMBIT_BENCH_ONLY=stream,conns,rr

# The same traffic without valgrind, sampled: the CPU variants valgrind cannot run
# (AES-GCM with AVX-512, say) that this machine picks.
if [ ! -f "$work/4-native.txt" ]; then
    perf record -o "$work/native.data" -e cpu-clock -F 4999 -a -- \
        env AMBIT_BENCH_ONLY=stream,conns,rr cargo bench -p ambit-benches --bench ztunnel_e2e
    perf script -i "$work/native.data" --no-demangle -F ip,sym,dso 2>/dev/null |
        awk '$NF ~ /\/ztunnel\)$/ && NF == 3 && $2 != "[unknown]" { n[$2]++ } END { for (s in n) print n[s], s }' |
        sort -rn | awk '{ print $2 }' >"$work/4-native.partial"
    mv "$work/4-native.partial" "$work/4-native.txt"
    rm -f "$work/native.data"
fi

# Functions in the order first seen: run by run, process by process, dump by dump
# (cg.PID.N are the periodic dumps, cg.PID the last one, written at exit).
for run in "$work"/[0-9]-*/; do
    for pid in $(ls "$run" | sed -n 's/^cg\.\([0-9]*\)$/\1/p' | sort -n); do
        ls "$run" | sed -n "s/^cg\.$pid\.\([0-9]*\)$/\1/p" | sort -n | sed "s|^|$run/cg.$pid.|"
        echo "$run/cg.$pid"
    done
done | xargs -r sed -n 's/^c\{0,1\}fn=//p' | sed "s/'[0-9]*$//" | grep -v '^0x\|^(' |
    cat - "$work/4-native.txt" | awk '!seen[$0]++' >"$work/functions.txt"

# Archive members of the C code without a section per function.
libc=$(gcc -print-file-name=libc.a)
# The newest build of aws-lc, the one the profiled binary linked.
awslc=$(find target/x86_64-unknown-linux-gnu/release/build -name 'libaws_lc_*_crypto.a' -printf '%T@ %p\n' |
    sort -rn | sed -n '1s/^[^ ]* //p')
members() { # archive, kind
    nm -A --defined-only "$1" 2>/dev/null | awk -v kind="$2" '$2 ~ /^[TtWi]$/ { n = split($1, a, ":"); print $3, kind, a[n - 1] }'
}
{ members "$libc" libc; [ -n "$awslc" ] && members "$awslc" awslc; } >"$work/members.txt"

awk '
    FILENAME == ARGV[1] { if (!($1 in kind)) { kind[$1] = $2; member[$1] = $3 }; next }
    {
        name = $0
        if (name in kind && kind[name] == "libc") {
            # strnlen-avx2.o: every strnlen-*.o, the CPU variants of one function.
            m = member[name]
            if (match(m, /-(sse|ssse|avx|evex)[^.]*\.o$/)) m = substr(m, 1, RSTART) "*.o"
            add("*libc.a:" m "(.text .text.*)")
            next
        }
        if (name in kind && kind[name] == "awslc") {
            # 6cca901d1d9807b8-sha256-x86_64.o: the hash is the build directory.
            m = member[name]
            sub(/^[0-9a-f]+-/, "*-", m)
            add("*:" m "(.text)")
        }
        if (name ~ /^_ZN/) sub(/17h[0-9a-f]+E(\.[0-9]+)?$/, "17h*", name)
        if (name ~ /^_R/) gsub(/Cs[0-9A-Za-z]+_/, "Cs*_", name)
        add(".text." name " .text.unlikely." name)
    }
    function add(p) {
        if (p in done) return
        done[p] = 1
        if (p ~ /^\*/) files[++nf] = p; else sections[++ns] = p
    }
    END {
        print "/* Generated by benches/code-order.sh from the functions ztunnel ran under"
        print "   the ztunnel_e2e benchmark: they go first in the code, the C archive members"
        print "   without a section per function, then every section of a Rust or C function"
        print "   the profile names (hashes left out). code-order.txt orders them inside. */"
        print "SECTIONS {"
        print "  .text.ambit_order : {"
        for (i = 1; i <= nf; i++) print "    " files[i]
        print "    *("
        for (i = 1; i <= ns; i++) print "      " sections[i]
        print "    )"
        print "  }"
        print "} INSERT BEFORE .text;"
    }
' "$work/members.txt" "$work/functions.txt" >ztunnel/code-order.ld
{
    echo "# Generated by benches/code-order.sh: the functions ztunnel ran under the"
    echo "# ztunnel_e2e benchmark, in the order first seen (start-up, then the data path)."
    echo "# Exact symbols: those of another build (other features, other versions) are"
    echo "# ignored, and code-order.ld still keeps their functions together."
    cat "$work/functions.txt"
} >ztunnel/code-order.txt
echo "code-order: $(wc -l <"$work/functions.txt") functions, $(grep -c '^      ' ztunnel/code-order.ld) section and $(grep -c '^    [*]' ztunnel/code-order.ld) archive member patterns"
