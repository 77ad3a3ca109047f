#!/usr/bin/env bash
# corral benchmarks: bench/run.sh overhead|syscalls|fleet|queue|discovery|streaming|fairness|placement|shared|profile|all
#
# Each scenario starts what it needs on 127.0.0.1 (release `corral sim`,
# release `corral`, Debian's nginx), measures with wrk or the loadgen example,
# writes its section of bench/results.md, and stops everything it started by
# PID on exit. Needs: wrk, nginx, curl, jq, taskset; builds with
#   cargo build --release --bin corral --examples
# Knobs: RUNS (repetitions, default 5), DURATION (seconds per wrk run, 5),
# SCAN_WINDOW (seconds of CPU measurement in `discovery`, 10);
# BUILD=0 to skip the cargo build; TARGET_DIR (default target/release) to
# run binaries built elsewhere, e.g. a quicker non-LTO build for iteration;
# BASELINE=/path/to/another/corral for `overhead` and `syscalls` to measure
# that build too, in the same run; BASELINE_DIR (a directory with an earlier
# build's `corral`) to measure it first, in the same run, in `queue` and the
# CPU share of `discovery`; PLACEMENT_SEED and PLACEMENT_SCALE for
# `placement`; BENCH_PROXY_PORT, BENCH_NGINX_PORT and BENCH_BASELINE_PORT
# move the proxies off 30990-30992.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET_DIR=${TARGET_DIR:-$ROOT/target/release}
CORRAL=$TARGET_DIR/corral
LOADGEN=$TARGET_DIR/examples/loadgen
FAIRBENCH=$TARGET_DIR/examples/fairbench
RESULTS=$ROOT/bench/results.md
RUNS=${RUNS:-5}
DURATION=${DURATION:-5}
SCAN_WINDOW=${SCAN_WINDOW:-10}
TMP=$(mktemp -d /tmp/corral-bench.XXXXXX)
chmod 755 "$TMP" # nginx workers may run as nobody
PIDS=()
# The loadgen appends the PIDs of the `corral sim` processes it starts here.
export BENCH_PID_FILE=$TMP/loadgen-children.pids

# Ports below the ephemeral range and above the block the tests draw from.
PROXY_PORT=${BENCH_PROXY_PORT:-30990}
NGINX_PORT=${BENCH_NGINX_PORT:-30991}
BASELINE_PORT=${BENCH_BASELINE_PORT:-30992}

cleanup() {
    local pid
    if [[ -f $BENCH_PID_FILE ]]; then
        # Only if the PID is still our `corral sim` (not reused by now).
        while read -r pid; do
            if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "^$CORRAL sim "; then
                PIDS+=("$pid")
            fi
        done <"$BENCH_PID_FILE"
    fi
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }

# start NAME CMD...: runs CMD in the background, logging to $TMP/NAME.log;
# the PID (of CMD itself: env and taskset exec) goes to $LAST_PID and PIDS.
start() {
    local name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# stop PID: SIGTERM, then SIGKILL after 5 s.
stop() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# wait_for URL JQ-FILTER: polls (20 s at most) until the JSON at URL passes.
wait_for() {
    local url=$1 filter=$2
    for _ in $(seq 200); do
        if curl -fs --max-time 1 "$url" 2>/dev/null | jq -e "$filter" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    log "timed out waiting for $url to satisfy $filter"
    return 1
}

# ports_free FIRST LAST: fails if anything listens in the range.
ports_free() {
    local busy
    busy=$(ss -Htln | awk -v a="$1" -v b="$2" '{n=split($4,p,":"); port=p[n]+0; if (port>=a && port<=b) print port}')
    if [[ -n $busy ]]; then
        log "ports in use in $1-$2: $busy"
        return 1
    fi
}

# start_sims FIRST COUNT CPU ARGS...: a `corral sim` process with COUNT servers.
start_sims() {
    local first=$1 count=$2 cpu=$3
    shift 3
    ports_free "$first" $((first + count - 1))
    start "sim-$first" taskset -c "$cpu" "$CORRAL" sim --port-start "$first" --count "$count" \
        --loaded llama3.2 "$@"
    SIM_PID=$LAST_PID
    wait_for "http://127.0.0.1:$((first + count - 1))/api/version" .version
}

# start_corral CPU VAR=VALUE...: the proxy on $PROXY_PORT, waiting for its
# first scan.
start_corral() {
    local cpu=$1
    shift
    ports_free $PROXY_PORT $PROXY_PORT
    start corral taskset -c "$cpu" env PROXY_HOST=127.0.0.1 PROXY_PORT=$PROXY_PORT \
        LOG_LEVEL=WARNING "$@" "$CORRAL"
    CORRAL_PID=$LAST_PID
    wait_for "http://127.0.0.1:$PROXY_PORT/__proxy/health" '.status == "ok"'
}
# The head every nginx.conf here shares: one worker, its files under $1.
nginx_head() {
    cat <<EOF
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 20000; }
http {
    access_log off;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}


# start_nginx CPU PORT...: nginx, one worker, least_conn over the ports.
start_nginx() {
    local cpu=$1
    shift
    ports_free $NGINX_PORT $NGINX_PORT
    local servers="" p
    for p in "$@"; do servers+="        server 127.0.0.1:$p;"$'\n'; done
    mkdir -p "$TMP/nginx"
    { nginx_head "$TMP/nginx"; cat <<EOF
    # The name is what \$proxy_host sends as Host; *.localhost passes the
    # Ollama (and sim) check for local host names.
    upstream sims.localhost {
        least_conn;
$servers        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://sims.localhost;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$proxy_host;
            proxy_buffering off;
        }
    }
}
EOF
    } >"$TMP/nginx/nginx.conf"
    start nginx taskset -c "$cpu" nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log"
    NGINX_PID=$LAST_PID
    for _ in $(seq 50); do
        NGINX_WORKER=$(cat "/proc/$NGINX_PID/task/$NGINX_PID/children" 2>/dev/null | awk '{print $1}')
        [[ -n ${NGINX_WORKER:-} ]] && break
        sleep 0.1
    done
    [[ -n ${NGINX_WORKER:-} ]] || { log "nginx did not start"; cat "$TMP/nginx/error.log" >&2; return 1; }
    # The placement runs start their fleet later, behind the running nginx.
    [[ ${NGINX_NO_WAIT:-0} == 1 ]] || wait_for "http://127.0.0.1:$NGINX_PORT/api/version" .version
}

# cpu_ticks PID: utime + stime in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# peak_rss_mb PID: VmHWM in MB.
peak_rss_mb() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
# kv KEY LINE: the value of KEY in a loadgen `key=value` line.
kv() { tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k {print $2}'; }
# median of the arguments.
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {if (NR % 2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b == 0 ? 0 : a / b)}'; }

# wrk_run CONNS URL: prints "rps p50_ms requests" of one wrk run on CPU 1.
wrk_run() {
    local conns=$1 url=$2 out
    out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 10s --latency \
        -s "$ROOT/bench/generate.lua" "$url")
    awk '
        function ms(v) {
            if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
            if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
            if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
            return v
        }
        /Requests\/sec:/ {rps = $2}
        /^ +50%/ {p50 = ms($2)}
        / requests in / {n = $1}
        /Non-2xx/ {bad = $4}
        END {printf "%s %.3f %s %d\n", rps, p50, n, bad}' <<<"$out"
}

# section NAME FILE: replaces NAME's section of results.md with FILE, put
# at the top (newest first: after the `<!-- newest first -->` line).
section() {
    local name=$1 file=$2
    [[ -f $RESULTS ]] || printf '# corral benchmark results\n\nNewest first; see bench/README.md.\n<!-- newest first -->\n' >"$RESULTS"
    {
        echo "<!-- $name -->"
        cat "$file"
        echo "<!-- /$name -->"
    } >"$TMP/section.md"
    awk -v name="$name" -v new="$TMP/section.md" '
        $0 == "<!-- " name " -->" {skip = 1; next}
        $0 == "<!-- /" name " -->" {skip = 0; next}
        skip {next}
        {print}
        $0 == "<!-- newest first -->" {while ((getline line <new) > 0) print line}' "$RESULTS" >"$TMP/results.md"
    cp "$TMP/results.md" "$RESULTS"
    cat "$file"
}

# machine [RUNS-TEXT]: the date, the machine, the load and how many runs.
machine() {
    echo "$(date -u +%F) · $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)) · load before: $(cut -d' ' -f1-3 /proc/loadavg) · ${1:-$RUNS runs, medians}"
}

# ===== scenarios =====

# start_fixed CPU FIRST COUNT: one nginx worker answering on COUNT ports a
# fixed Ollama-shaped `/api/generate` body (and the probes' `/api/tags`,
# `/api/ps`, `/api/version`): a backend cheaper than any proxy.
start_fixed() {
    local cpu=$1 first=$2 count=$3 listen="" p
    ports_free "$first" $((first + count - 1))
    for ((p = first; p < first + count; p++)); do listen+="        listen 127.0.0.1:$p;"$'\n'; done
    local model='"name":"llama3.2:latest","model":"llama3.2:latest","size":2019393189,"digest":"eaef5ad540b0","details":{"format":"gguf","family":"llama","parameter_size":"3.2B","quantization_level":"Q4_K_M"}'
    mkdir -p "$TMP/fixed"
    { nginx_head "$TMP/fixed"; cat <<EOF
    keepalive_requests 1000000;
    server {
$listen        default_type "application/json; charset=utf-8";
        location = /api/generate {
            return 200 '{"model":"llama3.2","created_at":"2026-01-01T00:00:00.000000000Z","response":"The sky is blue because air scatters blue light more than red light.","done":true,"done_reason":"stop","context":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16],"total_duration":7866647,"load_duration":4314470,"prompt_eval_count":7,"prompt_eval_duration":3500000,"eval_count":16,"eval_duration":23685}';
        }
        location = /api/tags { return 200 '{"models":[{$model}]}'; }
        location = /api/ps { return 200 '{"models":[{$model,"size_vram":2019393189,"context_length":4096}]}'; }
        location = /api/version { return 200 '{"version":"0.12.0"}'; }
    }
}
EOF
    } >"$TMP/fixed/nginx.conf"
    start fixed taskset -c "$cpu" nginx -p "$TMP/fixed" -c "$TMP/fixed/nginx.conf" -e "$TMP/fixed/error.log"
    FIXED_PID=$LAST_PID
    wait_for "http://127.0.0.1:$((first + count - 1))/api/version" .version
}

# overhead_round KIND: direct, corral and nginx least_conn in turn, RUNS
# times, over 4 backends of KIND (`sim`: instant `corral sim` servers;
# `fixed`: nginx answering a fixed body), backends and wrk on CPU 1, the
# proxies on CPU 0; appends KIND's table to $TMP/overhead.md.
overhead_round() {
    local kind=$1 first backends title
    case $kind in
        sim)
            first=31100
            title="instant \`corral sim\` backends"
            start_sims $first 4 1 --tokens-per-second 0 --parallel 64
            backends=$SIM_PID
            ;;
        fixed)
            first=31110
            title="nginx backends answering a fixed body"
            start_fixed 1 $first 4
            backends=$FIXED_PID
            ;;
    esac
    start_corral 0 BACKEND_PORT_START=$first BACKEND_PORT_END=$((first + 3)) MAX_CONCURRENT_PER_BACKEND=0
    wait_for "http://127.0.0.1:$PROXY_PORT/__proxy/health" '.healthy_backends == 4'
    start_nginx 0 $first $((first + 1)) $((first + 2)) $((first + 3))
    local direct=http://127.0.0.1:$first corral=http://127.0.0.1:$PROXY_PORT nginx=http://127.0.0.1:$NGINX_PORT
    local baseline=http://127.0.0.1:$BASELINE_PORT targets="direct corral nginx" baseline_pid=""
    if [[ -n ${BASELINE:-} ]]; then
        # Another corral binary (today's main), measured in the same run.
        ports_free $BASELINE_PORT $BASELINE_PORT
        start baseline taskset -c 0 env PROXY_HOST=127.0.0.1 PROXY_PORT=$BASELINE_PORT LOG_LEVEL=WARNING \
            BACKEND_PORT_START=$first BACKEND_PORT_END=$((first + 3)) MAX_CONCURRENT_PER_BACKEND=0 "$BASELINE"
        baseline_pid=$LAST_PID
        wait_for "$baseline/__proxy/health" '.healthy_backends == 4'
        targets+=" baseline"
    fi
    local -A rps p1 cpu
    local r t line t0 t1 pid n bad
    for t in $targets; do rps[$t]=""; p1[$t]=""; cpu[$t]=""; done
    # Warm up pools and caches.
    for t in $targets; do DURATION=1 wrk_run 64 "${!t}" >/dev/null; done
    for r in $(seq "$RUNS"); do
        for t in $targets; do
            pid=""
            [[ $t == corral ]] && pid=$CORRAL_PID
            [[ $t == baseline ]] && pid=$baseline_pid
            [[ $t == nginx ]] && pid=$NGINX_WORKER
            [[ -n $pid ]] && t0=$(cpu_ticks "$pid")
            read -r line _ n bad < <(wrk_run 64 "${!t}")
            if [[ -n $pid ]]; then
                t1=$(cpu_ticks "$pid")
                cpu[$t]+=" $(awk -v d=$((t1 - t0)) -v n="$n" 'BEGIN {printf "%.4f", d / 100 / n * 1000}')"
            fi
            ((bad == 0)) || log "$kind $t: $bad non-2xx answers"
            rps[$t]+=" $line"
            read -r _ line _ _ < <(DURATION=3 wrk_run 1 "${!t}")
            p1[$t]+=" $line"
            log "$kind run $r $t: rps=${rps[$t]##* } p50@1=${line}ms"
        done
    done
    local mr md mn pd pc pn cc cn
    # shellcheck disable=SC2086
    {
        md=$(median ${rps[direct]}); mr=$(median ${rps[corral]}); mn=$(median ${rps[nginx]})
        pd=$(median ${p1[direct]}); pc=$(median ${p1[corral]}); pn=$(median ${p1[nginx]})
        cc=$(median ${cpu[corral]}); cn=$(median ${cpu[nginx]})
    }
    cat >>"$TMP/overhead.md" <<EOF

### $title

| target | req/s (64 clients) | vs direct | p50 at 1 client | added p50 | CPU s / 1,000 req | peak RSS |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| direct to one backend | $md | 1.00 | ${pd} ms | — | — | — |
| corral | $mr | $(ratio "$mr" "$md") | ${pc} ms | $(awk -v a="$pc" -v b="$pd" 'BEGIN {printf "%.3f", a - b}') ms | $cc | $(peak_rss_mb "$CORRAL_PID") MB |
| nginx least_conn | $mn | $(ratio "$mn" "$md") | ${pn} ms | $(awk -v a="$pn" -v b="$pd" 'BEGIN {printf "%.3f", a - b}') ms | $cn | $(peak_rss_mb "$NGINX_WORKER") MB |

corral / nginx throughput: **$(ratio "$mr" "$mn")** (target ≥ 1.00); added p50, corral − nginx: **$(awk -v a="$pc" -v b="$pn" 'BEGIN {printf "%+.3f", a - b}') ms** (target ≤ 0); CPU per request, corral / nginx: $(ratio "$cc" "$cn"). Runs (req/s): corral${rps[corral]}; nginx${rps[nginx]}; direct${rps[direct]}.
EOF
    if [[ -n $baseline_pid ]]; then
        local mb pb cb
        # shellcheck disable=SC2086
        { mb=$(median ${rps[baseline]}); pb=$(median ${p1[baseline]}); cb=$(median ${cpu[baseline]}); }
        cat >>"$TMP/overhead.md" <<EOF

Baseline in the same run (\`BASELINE=$BASELINE\`): $mb req/s ($(ratio "$mb" "$mn") of nginx), added p50 $(awk -v a="$pb" -v b="$pd" 'BEGIN {printf "%.3f", a - b}') ms, CPU s / 1,000 req $cb; this build / baseline: throughput **$(ratio "$mr" "$mb")**, CPU per request $(ratio "$cc" "$cb"). Runs (req/s): baseline${rps[baseline]}.
EOF
        stop "$baseline_pid"
    fi
    stop "$NGINX_PID"
    stop "$CORRAL_PID"
    stop "$backends"
}

overhead() {
    log "overhead: 4 backends (instant sims, then fixed-body nginx) and wrk on CPU 1; corral and nginx on CPU 0"
    cat >"$TMP/overhead.md" <<EOF

## Overhead: 64 clients, proxy pinned to one core

$(machine) · corral $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
EOF
    overhead_round sim
    overhead_round fixed
    section overhead "$TMP/overhead.md"
}

# ctx_switches PID: voluntary and nonvoluntary context switches of all its threads.
ctx_switches() {
    cat /proc/"$1"/task/*/status 2>/dev/null |
        awk '/^voluntary_ctxt_switches/ {v += $2} /^nonvoluntary_ctxt_switches/ {n += $2} END {print v + 0, n + 0}'
}

# strace_counts PID URL OUT: `strace -f -c` on every thread of PID during
# one 64-client wrk run on URL; writes "syscall calls-per-request" lines to
# OUT (plus `requests`).
strace_counts() {
    local pid=$1 url=$2 out=$3 spid n
    strace -f -c -o "$out.raw" -p "$pid" 2>"$out.log" &
    spid=$!
    for _ in $(seq 100); do grep -q attached "$out.log" 2>/dev/null && break; sleep 0.05; done
    read -r _ _ n _ < <(wrk_run 64 "$url")
    kill -INT "$spid"
    wait "$spid" || true
    awk -v n="$n" '$1 ~ /^[0-9.]+$/ && NF >= 5 {calls = $4; name = $NF; printf "%s %.2f\n", name, calls / n}
        END {print "requests", n}' "$out.raw" >"$out"
}

# syscalls: what one request costs the kernel behind each proxy on the
# fixed-body rig: syscalls per request by kind (strace -f -c, which slows
# the proxy, so only the counts mean anything) and context switches per
# request (from /proc, in a run without strace).
syscalls() {
    local first=31120
    log "syscalls: 4 fixed-body nginx backends and wrk on CPU 1; proxies on CPU 0; strace -f -c"
    start_fixed 1 $first 4
    start_corral 0 BACKEND_PORT_START=$first BACKEND_PORT_END=$((first + 3)) MAX_CONCURRENT_PER_BACKEND=0
    wait_for "http://127.0.0.1:$PROXY_PORT/__proxy/health" '.healthy_backends == 4'
    start_nginx 0 $first $((first + 1)) $((first + 2)) $((first + 3))
    local -A url pid
    local targets="corral nginx" t
    url[corral]=http://127.0.0.1:$PROXY_PORT; pid[corral]=$CORRAL_PID
    url[nginx]=http://127.0.0.1:$NGINX_PORT; pid[nginx]=$NGINX_WORKER
    if [[ -n ${BASELINE:-} ]]; then
        ports_free $BASELINE_PORT $BASELINE_PORT
        start baseline taskset -c 0 env PROXY_HOST=127.0.0.1 PROXY_PORT=$BASELINE_PORT LOG_LEVEL=WARNING \
            BACKEND_PORT_START=$first BACKEND_PORT_END=$((first + 3)) MAX_CONCURRENT_PER_BACKEND=0 "$BASELINE"
        pid[baseline]=$LAST_PID; url[baseline]=http://127.0.0.1:$BASELINE_PORT
        wait_for "${url[baseline]}/__proxy/health" '.healthy_backends == 4'
        targets="corral baseline nginx"
    fi
    local -A vol nonvol threads user sys all ewait rate
    local c0 c1 u0 u1 n spid
    for t in $targets; do
        DURATION=1 wrk_run 64 "${url[$t]}" >/dev/null
        read -r -a c0 < <(ctx_switches "${pid[$t]}")
        read -r -a u0 < <(awk '{print $14, $15}' "/proc/${pid[$t]}/stat")
        perf stat -x, -e raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait -p "${pid[$t]}" \
            -o "$TMP/perf-$t.csv" &
        spid=$!
        read -r _ _ n _ < <(wrk_run 64 "${url[$t]}")
        kill -INT "$spid"
        wait "$spid" || true
        read -r -a u1 < <(awk '{print $14, $15}' "/proc/${pid[$t]}/stat")
        read -r -a c1 < <(ctx_switches "${pid[$t]}")
        user[$t]=$(awk -v a="${u0[0]}" -v b="${u1[0]}" -v n="$n" 'BEGIN {printf "%.1f", (b - a) * 10000 / n}')
        sys[$t]=$(awk -v a="${u0[1]}" -v b="${u1[1]}" -v n="$n" 'BEGIN {printf "%.1f", (b - a) * 10000 / n}')
        all[$t]=$(awk -F, -v n="$n" '$3 == "raw_syscalls:sys_enter" {printf "%.2f", $1 / n}' "$TMP/perf-$t.csv")
        ewait[$t]=$(awk -F, -v n="$n" '$3 == "syscalls:sys_enter_epoll_wait" {printf "%.2f", $1 / n}' "$TMP/perf-$t.csv")
        rate[$t]=$n
        vol[$t]=$(awk -v a="${c0[0]}" -v b="${c1[0]}" -v n="$n" 'BEGIN {printf "%.2f", (b - a) / n}')
        nonvol[$t]=$(awk -v a="${c0[1]}" -v b="${c1[1]}" -v n="$n" 'BEGIN {printf "%.2f", (b - a) / n}')
        threads[$t]=$(ls /proc/"${pid[$t]}"/task | wc -l)
        strace_counts "${pid[$t]}" "${url[$t]}" "$TMP/strace-$t.txt"
        log "syscalls $t: $(tr '\n' ' ' <"$TMP/strace-$t.txt")"
    done
    # kinds: the syscalls any target makes at least 0.05 times a request.
    local kinds
    kinds=$(cat "$TMP"/strace-*.txt | awk '$1 != "requests" && $1 != "total" && $2 >= 0.05 {print $1}' | sort -u)
    get() { awk -v k="$2" '$1 == k {v = $2} END {printf "%s", (v == "" ? "0" : v)}' "$TMP/strace-$1.txt"; }
    {
        echo
        echo "## Syscalls per request: fixed-body nginx backends, 64 clients, proxy pinned to one core"
        echo
        echo "$(machine "one run each") · corral $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo
        printf '| per request |'; for t in $targets; do printf ' %s |' "$t"; done; echo
        printf '| --- |'; for t in $targets; do printf ' ---: |'; done; echo
        for k in $kinds total; do
            printf '| `%s` |' "$k"; for t in $targets; do printf ' %s |' "$(get "$t" "$k")"; done; echo
        done
        printf '| all syscalls, untraced (perf stat) |'; for t in $targets; do printf ' %s |' "${all[$t]}"; done; echo
        printf '| `epoll_wait`, untraced |'; for t in $targets; do printf ' %s |' "${ewait[$t]}"; done; echo
        printf '| user CPU µs |'; for t in $targets; do printf ' %s |' "${user[$t]}"; done; echo
        printf '| kernel CPU µs |'; for t in $targets; do printf ' %s |' "${sys[$t]}"; done; echo
        printf '| voluntary context switches |'; for t in $targets; do printf ' %s |' "${vol[$t]}"; done; echo
        printf '| involuntary context switches |'; for t in $targets; do printf ' %s |' "${nonvol[$t]}"; done; echo
        printf '| threads |'; for t in $targets; do printf ' %s |' "${threads[$t]}"; done; echo
        printf '| requests counted (strace run) |'; for t in $targets; do printf ' %s |' "$(get "$t" requests)"; done; echo
        printf '| requests counted (untraced run) |'; for t in $targets; do printf ' %s |' "${rate[$t]}"; done; echo
        echo
        echo "Counts from \`strace -f -c -p\` over one ${DURATION} s wrk run (64 connections, \`POST /api/generate\`) per target, which slows the traced proxy but not what it calls per request; all syscalls and \`epoll_wait\` (\`perf stat\` tracepoints), user and kernel CPU (\`/proc/PID/stat\`, 10 ms ticks) and context switches (\`/proc/PID/task/*/status\`) over another run of the same length without strace.${BASELINE:+ baseline: \`$BASELINE\`.}"
    } >"$TMP/syscalls.md"
    section syscalls "$TMP/syscalls.md"
}

fleet() {
    log "fleet: 50 one-slot sims, 100 ms per request, 300 clients, 3,000 requests"
    start_sims 31000 50 0-1 --parallel 1 --tokens 10 --tokens-per-second 100
    local sims=$SIM_PID
    start_corral 0-1 BACKEND_PORT_START=31000 BACKEND_PORT_END=31049 MAX_CONCURRENT_PER_BACKEND=1 SCAN_INTERVAL_SECONDS=5
    wait_for "http://127.0.0.1:$PROXY_PORT/__proxy/health" '.healthy_backends == 50'
    local r line all_rps="" all_q="" over0 over1 over_total=0 errors=0 service ideal
    # The sim's real time per request (10 tokens at 100/s plus its own work),
    # measured direct: the fleet cannot beat 50 backends / that.
    line=$("$LOADGEN" fleet --url http://127.0.0.1:31000 --clients 1 --requests 20 --timeout-secs 20)
    service=$(kv p50_ms "$line")
    ideal=$(awk -v s="$service" 'BEGIN {printf "%.1f", 50 * 1000 / s}')
    log "direct service time p50 ${service} ms: ideal ${ideal} req/s"
    oversubscribed() {
        local p s=0 v
        for p in $(seq 31000 31049); do
            v=$(curl -fs --max-time 5 "http://127.0.0.1:$p/__sim/stats" | jq .oversubscribed)
            s=$((s + v))
        done
        echo "$s"
    }
    for r in $(seq "$RUNS"); do
        over0=$(oversubscribed)
        line=$("$LOADGEN" fleet --url "http://127.0.0.1:$PROXY_PORT" --clients 300 --requests 3000 --timeout-secs 60)
        over1=$(oversubscribed)
        over_total=$((over_total + over1 - over0))
        errors=$((errors + $(kv errors "$line")))
        all_rps+=" $(kv rps "$line")"
        all_q+=" $(kv queue_p99_ms "$line")"
        log "run $r: $line oversubscribed=$((over1 - over0))"
    done
    local m
    # shellcheck disable=SC2086
    m=$(median $all_rps)
    cat >"$TMP/fleet.md" <<EOF

## Fleet efficiency: 50 one-slot backends, 100 ms per request, 300 clients, 3,000 requests

$(machine)

| req/s | of ideal 500 | of measured ideal ($ideal) | p99 queue wait (X-Corral-Queue-Ms) | over-subscribed (all runs) | errors (all runs) |
| ---: | ---: | ---: | ---: | ---: | ---: |
| $m | $(ratio "$m" 500) | $(ratio "$m" "$ideal") | $(median $all_q) ms | $over_total | $errors |

Runs (req/s):$all_rps. The measured ideal is 50 backends / the sim's own time per request (p50 ${service} ms, direct, one client), which is over the nominal 100 ms.
EOF
    section fleet "$TMP/fleet.md"
    stop "$CORRAL_PID"
    stop "$sims"
}

# listen_overflows: TcpExtListenOverflows, connections the kernel dropped
# because a listener's accept queue was full (all listeners of the host).
listen_overflows() {
    awk '$1 == "TcpExt:" { if (!col) { for (i = 2; i <= NF; i++) if ($i == "ListenOverflows") col = i } else { print $col; exit } }' /proc/net/netstat
}

# tcpext FILE: the TcpExt counters as "name value" lines into FILE;
# tcpext_moved BEFORE AFTER: those that moved, "name+delta" on one line.
tcpext() { awk '$1 == "TcpExt:" { if (!n) { for (i = 2; i <= NF; i++) k[i] = $i; n = NF } else for (i = 2; i <= n; i++) print k[i], $i }' /proc/net/netstat >"$1"; }
tcpext_moved() { awk 'NR == FNR {b[$1] = $2; next} $2 != b[$1] {printf "%s+%d ", $1, $2 - b[$1]}' "$1" "$2"; }
# tcpext_delta NAME: how far NAME moved between tcpext-before and tcpext-after.
tcpext_delta() { awk -v k="$1" 'NR == FNR {if ($1 == k) b = $2; next} $1 == k {print $2 - b}' "$TMP/tcpext-before" "$TMP/tcpext-after"; }

# storm_row LABEL LINE OVERFLOWS: one row of the connect-storm table.
storm_row() {
    local line=$2
    echo "| $1 | $(kv connected "$line") | $3 | $(tcpext_delta TCPSynRetrans) | $(kv connect_p50_ms "$line") ms | $(kv connect_p99_ms "$line") ms | $(kv connect_max_ms "$line") ms | $(kv health_p50_ms "$line") ms | $(kv health_p99_ms "$line") ms | $(kv health_max_ms "$line") ms |" >>"$TMP/storm-rows.md"
}

# storm LABEL URL WANT: WANT clients connect to URL at once; logs the
# loadgen's line and the TcpExt counters that moved, writes LABEL's row of
# the storm table, and leaves the loadgen's line in STORM_LINE.
storm() {
    local before
    before=$(listen_overflows)
    tcpext "$TMP/tcpext-before"
    STORM_LINE=$(taskset -c 1 "$LOADGEN" queue --proxy "$2" --clients "$3" --hold-secs 10)
    tcpext "$TMP/tcpext-after"
    log "$1: $STORM_LINE"
    log "$1: TcpExt moved: $(tcpext_moved "$TMP/tcpext-before" "$TMP/tcpext-after")"
    storm_row "$1" "$STORM_LINE" $(($(listen_overflows) - before))
}

# queue_nginx WANT: the same storm against nginx on CPU 0, which holds every
# request but the first in limit_req's delay queue and answers
# /__proxy/health itself.
queue_nginx() {
    local want=$1
    start_sims 31200 1 1 --parallel 1 --tokens-per-second 1
    local sims=$SIM_PID
    ports_free $NGINX_PORT $NGINX_PORT
    mkdir -p "$TMP/nginx-queue"
    { nginx_head "$TMP/nginx-queue"; cat <<EOF
    limit_req_zone \$host zone=queue:1m rate=1r/m;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location = /__proxy/health {
            default_type application/json;
            return 200 '{"status":"ok"}';
        }
        location / {
            limit_req zone=queue burst=100000;
            proxy_pass http://127.0.0.1:31200;
            proxy_set_header Host localhost;
        }
    }
}
EOF
    } >"$TMP/nginx-queue/nginx.conf"
    start nginx-queue taskset -c 0 nginx -p "$TMP/nginx-queue" -c "$TMP/nginx-queue/nginx.conf" -e "$TMP/nginx-queue/error.log"
    local nginx=$LAST_PID
    wait_for "http://127.0.0.1:$NGINX_PORT/__proxy/health" '.status == "ok"'
    storm nginx "http://127.0.0.1:$NGINX_PORT" "$want"
    stop "$nginx"
    stop "$sims"
}

# queue_row LABEL BIN: one row of the queue table for the proxy binary BIN.
queue_row() {
    local label=$1 bin=$2 want=$3
    start_sims 31200 1 1 --parallel 1 --tokens-per-second 1
    local sims=$SIM_PID
    CORRAL=$bin start_corral 0 BACKEND_PORT_START=31200 BACKEND_PORT_END=31200 MAX_CONCURRENT_PER_BACKEND=1
    wait_for "http://127.0.0.1:$PROXY_PORT/__proxy/health" '.healthy_backends == 1'
    local rss0 line gen queued inflight
    rss0=$(peak_rss_mb "$CORRAL_PID")
    storm "corral, $label" "http://127.0.0.1:$PROXY_PORT" "$want"
    line=$STORM_LINE
    sleep 1
    gen=$(curl -fs --max-time 5 http://127.0.0.1:31200/__sim/stats | jq '.requests["/api/generate"] // 0')
    queued=$(curl -fs --max-time 5 "http://127.0.0.1:$PROXY_PORT/metrics" | awk '/^corral_queue_depth / {print $2}')
    inflight=$(curl -fs --max-time 5 "http://127.0.0.1:$PROXY_PORT/__proxy/backends" | jq '[.backends[].in_flight] | add')
    echo "| $label | $(kv connected "$line") | $(peak_rss_mb "$CORRAL_PID") MB | $rss0 MB | $gen | ${queued:-?} | $inflight |" >>"$TMP/queue-rows.md"
    stop "$CORRAL_PID"
    stop "$sims"
}

queue() {
    log "queue: one slow backend, 10,000 waiting clients"
    local want=10000 netns="the host's network namespace, shared with other programs' listeners"
    [[ -n ${BENCH_NETNS:-} ]] && netns="a network namespace of its own"
    if [[ $(ulimit -Hn) == unlimited ]]; then ulimit -n 65536; else ulimit -n "$(ulimit -Hn)"; fi
    # corral and the loadgen each hold one descriptor per client.
    if (($(ulimit -n) < want + 1000)); then
        want=$(($(ulimit -n) - 1000))
        log "ulimit -n is $(ulimit -n): $want clients"
    fi
    : >"$TMP/queue-rows.md"
    : >"$TMP/storm-rows.md"
    local machine_line
    machine_line=$(machine "one run: nginx first${BASELINE_DIR:+, then the baseline binary}, then this build; in $netns")
    queue_nginx "$want"
    if [[ -n ${BASELINE_DIR:-} ]]; then queue_row baseline "$BASELINE_DIR/corral" "$want"; fi
    queue_row "this build" "$CORRAL" "$want"
    cat >"$TMP/queue.md" <<EOF

## Queue at scale: one slow backend, $want waiting clients

$machine_line

The storm: all $want clients connect at once (the loadgen on CPU 1, the proxy on CPU 0) while \`/__proxy/health\` is asked every 10 ms. Listen overflows are the rise of TcpExtListenOverflows in /proc/net/netstat over the run (connections the kernel dropped because the accept queue was full), SYNs retransmitted that of TcpExtTCPSynRetrans (clients that waited a second or more to connect). A connect time is from the call to the loadgen's task seeing the connection, so with no retransmission its tail is the loadgen's own single core getting round to all its tasks, alike for both servers. nginx holds every request but the first in limit_req's delay queue and answers the health path itself.

| server | clients connected | listen overflows | SYNs retransmitted | connect p50 | p99 | max | health p50 | p99 | max |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
$(cat "$TMP/storm-rows.md")

| corral | clients parked | peak RSS | RSS before | reached the backend | queue after | in flight after |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
$(cat "$TMP/queue-rows.md")

"Reached the backend" counts /api/generate requests the sim received: the first client holds the one slot until 2 s after all the others gave up while waiting, so 1 means that no client that gave up reached the backend.
EOF
    section queue "$TMP/queue.md"
}

# scan_cpu BIN: sets SCAN_CPU to corral's CPU share (% of a core) over
# SCAN_WINDOW seconds with no requests, scanning 31500-32500 every second
# with 3 live ports. (Not a $(...) subshell: the PIDs it starts must reach
# cleanup.)
scan_cpu() {
    local bin=$1 t0 t1
    start_sims 32100 3 1
    local sims=$SIM_PID
    CORRAL=$bin start_corral 0-1 BACKEND_PORT_START=31500 BACKEND_PORT_END=32500 SCAN_INTERVAL_SECONDS=1 MAX_CONCURRENT_PER_BACKEND=0
    wait_for "http://127.0.0.1:$PROXY_PORT/__proxy/health" '.healthy_backends == 3'
    sleep 2
    t0=$(cpu_ticks "$CORRAL_PID")
    sleep "$SCAN_WINDOW"
    t1=$(cpu_ticks "$CORRAL_PID")
    stop "$CORRAL_PID"
    stop "$sims"
    log "$bin: $((t1 - t0)) ticks in $SCAN_WINDOW s"
    SCAN_CPU=$(awk -v d=$((t1 - t0)) -v w="$SCAN_WINDOW" 'BEGIN {printf "%.1f", d / 100 / w * 100}')
}

discovery() {
    log "discovery: a 1,001-port scan range, SCAN_INTERVAL_SECONDS=1"
    ports_free 31500 32500
    # Three live backends in the range while corral's CPU is measured, as a
    # fleet would have; the rest of the 1,001 ports refuse connections. No
    # requests in that window: the ticks are the scan loop's (and the
    # dashboard sampler's, once a second).
    local cpu_base="" cpu line
    if [[ -n ${BASELINE_DIR:-} ]]; then
        scan_cpu "$BASELINE_DIR/corral"
        cpu_base=$SCAN_CPU
    fi
    scan_cpu "$CORRAL"
    cpu=$SCAN_CPU
    start_corral 0-1 BACKEND_PORT_START=31500 BACKEND_PORT_END=32500 SCAN_INTERVAL_SECONDS=1 MAX_CONCURRENT_PER_BACKEND=0
    line=$("$LOADGEN" discovery --proxy "http://127.0.0.1:$PROXY_PORT" --corral "$CORRAL" --port 32000 --rounds "$RUNS")
    log "$line"
    curl -fs --max-time 5 "http://127.0.0.1:$PROXY_PORT/metrics" | grep 'backend="32000"' | grep -v '^#' >&2 || true
    cat >"$TMP/discovery.md" <<EOF

## Discovery: 1,001-port range, SCAN_INTERVAL_SECONDS=1

$(machine)

| start to first answer, median | max | requests to a killed backend after the kill | client errors | corral CPU while scanning (3 live ports of 1,001, no requests, ${SCAN_WINDOW} s) |
| ---: | ---: | ---: | ---: | ---: |
| $(kv serve_p50_ms "$line") ms | $(kv serve_max_ms "$line") ms | $(kv killed_attempts_after_kill "$line") (of $(kv requests "$line")) | $(kv client_errors "$line") | $cpu% of a core${cpu_base:+ (baseline binary: $cpu_base%)} (target < 5 %) |

"Start" is the spawn of \`corral sim\`, with a request already waiting in corral's queue. The kill is SIGKILL under back-to-back requests from one client; the count is corral_backend_requests_total of the killed backend after the kill (1 = only the attempt that failed). The CPU share is corral's utime + stime from /proc over the window, one scan of the whole range a second.
EOF
    section discovery "$TMP/discovery.md"
    stop "$CORRAL_PID"
}

streaming() {
    log "streaming: 200 streams of 500 tokens at 100 tokens/s"
    start_sims 31300 4 1 --parallel 50 --tokens-per-second 100 --tokens 500
    local sims=$SIM_PID
    start_corral 0 BACKEND_PORT_START=31300 BACKEND_PORT_END=31303 MAX_CONCURRENT_PER_BACKEND=50
    wait_for "http://127.0.0.1:$PROXY_PORT/__proxy/health" '.healthy_backends == 4'
    local direct="http://127.0.0.1:31300,http://127.0.0.1:31301,http://127.0.0.1:31302,http://127.0.0.1:31303"
    local corral=http://127.0.0.1:$PROXY_PORT
    local -A ttfb g50 g99 gmax lines
    local r t line
    # Warm up: corral's pool to the sims fills.
    taskset -c 1 "$LOADGEN" stream --urls "$corral" --streams 200 --tokens 5 --ramp-ms 0 >/dev/null
    for r in $(seq "$RUNS"); do
        for t in direct corral; do
            line=$(taskset -c 1 "$LOADGEN" stream --urls "${!t}" --streams 200 --tokens 500)
            log "run $r $t: $line"
            ttfb[$t]+=" $(kv ttfb_p50_ms "$line")"
            g50[$t]+=" $(kv gap_p50_ms "$line")"
            g99[$t]+=" $(kv gap_p99_ms "$line")"
            gmax[$t]+=" $(kv gap_max_ms "$line")"
            lines[$t]="$(kv lines "$line") lines in $(kv reads "$line") reads"
        done
    done
    local td tc
    # shellcheck disable=SC2086
    {
        td=$(median ${ttfb[direct]}); tc=$(median ${ttfb[corral]})
    }
    # shellcheck disable=SC2086
    cat >"$TMP/streaming.md" <<EOF

## Streaming: 200 concurrent streams of 500 tokens (100 tokens/s), started over 2 s

$(machine)

| target | TTFB p50 | inter-line gap p50 | p99 | max | last run |
| --- | ---: | ---: | ---: | ---: | --- |
| direct | $td ms | $(median ${g50[direct]}) ms | $(median ${g99[direct]}) ms | $(median ${gmax[direct]}) ms | ${lines[direct]} |
| corral | $tc ms | $(median ${g50[corral]}) ms | $(median ${g99[corral]}) ms | $(median ${gmax[corral]}) ms | ${lines[corral]} |

TTFB added by corral (p50): **$(awk -v a="$tc" -v b="$td" 'BEGIN {printf "%.3f", a - b}') ms** (target < 1 ms).
EOF
    section streaming "$TMP/streaming.md"
    stop "$CORRAL_PID"
    stop "$sims"
}

fairness() {
    log "fairness: 10 one-slot sims at ~100 ms per request; a flood of 20,000 against one request every 2 s"
    start_sims 31600 10 1 --parallel 1 --tokens 10 --tokens-per-second 100
    local sims=$SIM_PID
    start_corral 0 BACKEND_PORT_START=31600 BACKEND_PORT_END=31609 MAX_CONCURRENT_PER_BACKEND=1 \
        QUEUE_TIMEOUT_SECONDS=600
    wait_for "http://127.0.0.1:$PROXY_PORT/__proxy/health" '.healthy_backends == 10'
    local burst shares
    burst=$(taskset -c 1 "$FAIRBENCH" burst --proxy "http://127.0.0.1:$PROXY_PORT" --bulk 20000 --every-ms 2000 --probes 15 --tokens 10)
    log "$burst"
    stop "$CORRAL_PID"
    # Ten tenants: tenant i queues 150 × (10 − i) requests of 2 × (i + 1)
    # tokens (20 to 200 ms each), all at once.
    start_corral 0 BACKEND_PORT_START=31600 BACKEND_PORT_END=31609 MAX_CONCURRENT_PER_BACKEND=1 \
        QUEUE_TIMEOUT_SECONDS=600
    wait_for "http://127.0.0.1:$PROXY_PORT/__proxy/health" '.healthy_backends == 10'
    shares=$(taskset -c 1 "$FAIRBENCH" shares --proxy "http://127.0.0.1:$PROXY_PORT" --base 150 --tokens 2 --window-secs 10)
    log "$shares"
    cat >"$TMP/fairness.md" <<EOF

## Fairness through HTTP: 10 one-slot sims, tenants by X-Corral-Tenant

$(machine "one run")

A flood and a trickle: tenant A queues 20,000 batch requests at once (on
HTTP/2, 200 streams a connection); tenant B sends one interactive request
every 2 s, 15 times. Service time ~100 ms (10 tokens at 100/s), scaled down
from real generations so that the run fits a 2-core machine.

| A queued | B requests | B wait p50 | p99 | max | service p50 | B p99 / service (target ≤ 2) |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| $(kv queued "$burst") | $(kv probes "$burst") | $(kv b_wait_p50_ms "$burst") ms | $(kv b_wait_p99_ms "$burst") ms | $(kv b_wait_max_ms "$burst") ms | $(kv service_p50_ms "$burst") ms | $(kv p99_over_service "$burst") |

Ten tenants with unequal demand: tenant i queues 150 × (10 − i) requests of
2 × (i + 1) tokens (20 to 200 ms) at once, so t0 sends ten times the
requests of t9, each a tenth as long. Slot-seconds per tenant (the proxy's
account in \`/__proxy/backends\`: grant to release of each finished request)
over a window that opens once the queue is at its deepest and closes after 10 s or
when a tenant runs out of waiters ("drained early"):

| requests | window | drained early | Jain's index (target ≥ 0.95) | worst tenant off its fair share (target ≤ 0.10) | slot-seconds t0..t9 |
| ---: | ---: | --- | ---: | ---: | --- |
| $(kv requests "$shares") | $(kv window_s "$shares") s | $(kv drained_early "$shares") | $(kv jain "$shares") | $(kv worst_off_fair "$shares") | $(kv slot_seconds "$shares") |
EOF
    section fairness "$TMP/fairness.md"
    stop "$CORRAL_PID"
    stop "$sims"
}

placement() {
    local first=31200 seed=${PLACEMENT_SEED:-1} scale=${PLACEMENT_SCALE:-1.0}
    log "placement: 4 in-process sims per run on ports $first-$((first + 3)), corral in-process, nginx on CPU 0; seed $seed, scale $scale"
    ports_free $first $((first + 3))
    NGINX_NO_WAIT=1 start_nginx 0 $first $((first + 1)) $((first + 2)) $((first + 3))
    "$TARGET_DIR/examples/placement" --seed "$seed" --scale "$scale" \
        --port-start $first --nginx-url "http://127.0.0.1:$NGINX_PORT" >"$TMP/placement.out"
    {
        echo "## placement"
        echo
        echo "$(machine "one run") · PLACEMENT_SEED=$seed PLACEMENT_SCALE=$scale"
        echo
        echo "4 simulated backends per run (parallel 1, prompt speed 2,000 tokens/s, host prompt cache"
        echo "8,192 tokens), MAX_CONCURRENT_PER_BACKEND=0 for corral; a fresh fleet for every row."
        sed '$d' "$TMP/placement.out"
        echo
        echo "Ratios (above 1: cache-aware better): \`$(tail -1 "$TMP/placement.out")\`"
    } >"$TMP/placement.md"
    section placement "$TMP/placement.md" >&2
    stop "$NGINX_PID"
    tail -1 "$TMP/placement.out"
}

shared() {
    log "shared: SHARED_STATE through redis-server; 10 one-slot sims, 1 instance against 3"
    command -v redis-server >/dev/null || { echo "bench/run.sh shared needs redis-server (apt-get install -y redis-server)" >&2; exit 2; }
    local table
    table=$("$TARGET_DIR/examples/shared_bench" --backends 10 --requests 2000 --clients 60)
    cat >"$TMP/shared.md" <<EOF

## Shared state: three instances sharing one fleet through Redis (\`examples/shared_bench.rs\`)

$(machine "one run")

Ten one-slot simulated backends (20 ms a request) and one \`redis-server\`,
all in one run: one client sending one request at a time through one
instance without and with SHARED_STATE (the added latency per request),
then 2,000 requests from 60 clients through one plain instance and through
three instances sharing Redis (efficiency = ideal busy time / wall time).

$table
EOF
    section shared "$TMP/shared.md"
}

# profile: `perf record -g` on corral (CPU 0) for DURATION seconds under 64
# wrk clients over the fixed-body nginx backends; prints where its CPU goes,
# by library and by symbol (perf report text), into $TMP and to stdout.
# PROFILE_BIN=/path/to/corral profiles another build the same way;
# PROFILE_KEEP=FILE keeps the perf.data.
profile() {
    command -v perf >/dev/null || { log "profile needs perf (apt-get install -y linux-perf)"; return 2; }
    local bin=${PROFILE_BIN:-$CORRAL}
    log "profile: $bin under 64 clients, fixed-body backends"
    start_fixed 1 31110 4
    local backends=$FIXED_PID
    CORRAL=$bin start_corral 0 BACKEND_PORT_START=31110 BACKEND_PORT_END=31113 MAX_CONCURRENT_PER_BACKEND=0
    wait_for "http://127.0.0.1:$PROXY_PORT/__proxy/health" '.healthy_backends == 4'
    DURATION=1 wrk_run 64 "http://127.0.0.1:$PROXY_PORT" >/dev/null
    # PROFILE_CALL_GRAPH=dwarf finds the callers of libc's functions too.
    perf record -q -F 2000 --call-graph "${PROFILE_CALL_GRAPH:-fp}" -o "$TMP/perf.data" -p "$CORRAL_PID" -- sleep "$DURATION" 2>/dev/null &
    local perf_pid=$!
    wrk_run 64 "http://127.0.0.1:$PROXY_PORT" >"$TMP/profile-wrk.txt"
    wait "$perf_pid" || true
    log "profile: $(cat "$TMP/profile-wrk.txt") (req/s p50_ms requests non-2xx)"
    perf report -i "$TMP/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' >"$TMP/by-dso.txt" || true
    perf report -i "$TMP/perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' >"$TMP/by-sym.txt" || true
    {
        echo "## by library (self time)"
        sed -n 1,15p "$TMP/by-dso.txt"
        echo "## by symbol (self time, top 40)"
        sed -n 1,40p "$TMP/by-sym.txt"
    } | tee "$TMP/profile.txt"
    # PROFILE_KEEP=FILE keeps perf.data for `perf report -i FILE`.
    [[ -z ${PROFILE_KEEP:-} ]] || cp "$TMP/perf.data" "$PROFILE_KEEP"
    stop "$CORRAL_PID"
    stop "$backends"
}

# ===== main =====

case ${1:-} in
overhead | syscalls | fleet | queue | discovery | streaming | fairness | placement | shared | profile | all) ;;
*)
    echo "usage: bench/run.sh overhead|syscalls|fleet|queue|discovery|streaming|fairness|placement|shared|profile|all" >&2
    exit 2
    ;;
esac
tools="curl jq taskset"
case $1 in overhead | profile | all) tools+=" wrk nginx" ;; syscalls) tools+=" wrk nginx strace" ;; placement | queue) tools+=" nginx" ;; esac
for tool in $tools; do
    command -v "$tool" >/dev/null || { echo "bench/run.sh needs $tool (apt-get install -y wrk nginx curl jq)" >&2; exit 2; }
done
if [[ ${BUILD:-1} != 0 ]]; then
    cargo build --release --bin corral --examples --quiet
fi
# The listen-overflow counter is per network namespace: `queue` runs in a
# namespace of its own where it can (root), so that other programs'
# listeners on the host do not count.
if [[ $1 == queue && -z ${BENCH_NETNS:-} ]] && unshare -n true 2>/dev/null; then
    rm -rf "$TMP"
    exec env BUILD=0 BENCH_NETNS=1 unshare -n bash -c 'ip link set lo up && exec "$0" "$@"' "$ROOT/bench/run.sh" "$@"
fi
log "load: $(cut -d' ' -f1-3 /proc/loadavg)"
if [[ $1 == all ]]; then
    overhead
    fleet
    queue
    discovery
    streaming
    fairness
    placement
    shared
else
    "$1"
fi
