#!/usr/bin/env bash
# Build the CPU container image with podman, run it on 127.0.0.1, wait for /ready and send a
# chat completion through it (with a LoRA patch when one is in adapters/), then clean up.
#
#   as root:  scripts/container-test.sh [--until podman|base|context|build]
#   (--until stops after that phase, e.g. `--until base` to warm the base-image cache)
#
# Phases (each timed, summary at the end):
#   1 podman     install podman/runc/debootstrap from Debian if missing; write containers.conf
#   2 base       local base image: debootstrap --variant=minbase bookworm + python3/venv/pip + this
#                machine's CA certificates, `podman import`ed. Cached: skipped when the image for
#                the same recipe exists (SAFEPATCH_CT_REBUILD_BASE=1 forces it).
#   3 context    torch==2.13.0+cpu wheel (not on PyPI) from the local wheel folder
#                (PIP_FIND_LINKS, else /opt/wheels) into .container/wheels/ in the build context
#   4 build      podman build --build-arg FLAVOR=cpu --build-arg BASE=<local base>
#   5 start      podman run on 127.0.0.1:<free port>, poll GET /ready until 200 (timeout)
#   6 request    GET /health, the image's HEALTHCHECK; as admin, a tenant + API key; as that
#                tenant, POST /v1/chat/completions with the patch (and the same on the base
#                model, to show the difference), or a base request when there is no patch
#
# Settings (env):
#   SAFEPATCH_CT_IMAGE          image tag to build           (localhost/safepatch:cpu-test)
#   SAFEPATCH_CT_BASE_IMAGE     use this base, skip phase 2  (default: built locally)
#   SAFEPATCH_CT_REBUILD_BASE   1: rebuild the base image even when cached
#   SAFEPATCH_CT_NO_CACHE       1: podman build --no-cache
#   SAFEPATCH_CT_READY_TIMEOUT  seconds to wait for /ready   (900)
#   SAFEPATCH_CT_SHM_SIZE       container /dev/shm size       (1g; vLLM needs > 160 MiB)
#   SAFEPATCH_CT_OMP_BIND       VLLM_CPU_OMP_THREADS_BIND in the container (nobind; vLLM's
#                               `auto` pinned every vLLM CPU worker of this shared 2-core host
#                               to core 0, where they starve each other)
#   SAFEPATCH_CT_PATCH          patch to send                (refusal-general, if in adapters/)
#   SAFEPATCH_CT_ADAPTERS_DIR   host folder mounted read-only at /app/adapters instead of the
#                               image's copy of adapters/ (files must be readable by uid 10001)
#   SAFEPATCH_CT_KEEP_IMAGE     1: keep the built image (default: kept; 0 removes it)
#   SAFEPATCH_CT_DEBIAN_MIRROR  debootstrap mirror            (http://deb.debian.org/debian)
# Exit status: 0 when the chat completion came back well-formed, non-zero otherwise.
set -euo pipefail

UNTIL=""
case "${1:-}" in
  --until) UNTIL="${2:?--until needs a phase}"; shift 2 ;;
  --until=*) UNTIL="${1#--until=}"; shift ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--until podman|base|context|build]" >&2; exit 2 ;;
esac
case "$UNTIL" in ""|podman|base|context|build) ;; *) echo "bad phase: $UNTIL" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
REPO=$(pwd)
SCRATCH="$REPO/.container"          # git-ignored build scratch
mkdir -p "$SCRATCH"

IMAGE="${SAFEPATCH_CT_IMAGE:-localhost/safepatch:cpu-test}"
READY_TIMEOUT="${SAFEPATCH_CT_READY_TIMEOUT:-900}"
SHM_SIZE="${SAFEPATCH_CT_SHM_SIZE:-1g}"
OMP_BIND="${SAFEPATCH_CT_OMP_BIND:-nobind}"
MIRROR="${SAFEPATCH_CT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
TORCH_WHEEL_GLOB="torch-2.13.0+cpu-*.whl"
BASE_PACKAGES="python3,python3-venv,python3-pip,ca-certificates"
BASE_RECIPE_VERSION=1               # bump when the base recipe below changes
CONTAINER=""

log() { printf '[container-test %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# ---- phase timing --------------------------------------------------------------------------
declare -a PHASE_NAMES=() PHASE_SECS=() PHASE_NOTES=()
PHASE_T0=0
T_START=$(date +%s.%N)
phase_begin() { PHASE_T0=$(date +%s.%N); log "== $1"; }
phase_end() {  # name [note]
  local dt
  dt=$(awk -v a="$PHASE_T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  PHASE_NAMES+=("$1"); PHASE_SECS+=("$dt"); PHASE_NOTES+=("${2:-}")
  log "   $1 done in ${dt}s ${2:+($2)}"
  if [[ "$1" == "$UNTIL" ]]; then log "stopping after phase $1 (--until)"; exit 0; fi
}
summary() {
  local total i
  total=$(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  {
    echo
    echo "container-test timings"
    printf '  %-10s %9s  %s\n' phase seconds note
    for i in "${!PHASE_NAMES[@]}"; do
      printf '  %-10s %9s  %s\n' "${PHASE_NAMES[$i]}" "${PHASE_SECS[$i]}" "${PHASE_NOTES[$i]}"
    done
    printf '  %-10s %9s\n' total "$total"
  } >&2
}

cleanup() {
  local rc=$?
  if [[ -n "$CONTAINER" ]]; then
    if [[ $rc -ne 0 ]]; then
      log "container logs (last 80 lines):"
      podman logs --tail 80 "$CONTAINER" >&2 2>&1 || true
    fi
    podman rm -f -v -t 10 "$CONTAINER" >/dev/null 2>&1 || true
  fi
  if [[ "${SAFEPATCH_CT_KEEP_IMAGE:-1}" == 0 ]]; then
    podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
  fi
  summary
  if [[ $rc -eq 0 ]]; then log "PASS"; else log "FAILED (exit $rc)"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $(id -u) -eq 0 ]] || die "run as root (podman is set up rootful, as in issue 7)"

# ---- 1: podman -----------------------------------------------------------------------------
phase_begin podman
note="present"
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
if [[ -z "${SAFEPATCH_CT_BASE_IMAGE:-}" ]]; then
  command -v debootstrap >/dev/null || need+=(debootstrap)
fi
if ((${#need[@]})); then
  log "installing ${need[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q podman runc debootstrap >/dev/null
  note="installed"
fi
# The settings issue 7 found to work here: runc, cgroupfs (no systemd), file events (no
# journald), explicit ulimits. Our copy is used through CONTAINERS_CONF, so a host config that
# differs is left alone; /etc/containers/containers.conf is written only where none exists.
nofile=$(ulimit -Hn)
[[ "$nofile" == unlimited ]] && nofile=1048576
cat > "$SCRATCH/containers.conf" <<EOF
# Written by scripts/container-test.sh (settings from issue 7)
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$SCRATCH/containers.conf"
if [[ ! -e /etc/containers/containers.conf ]]; then
  mkdir -p /etc/containers
  cp "$SCRATCH/containers.conf" /etc/containers/containers.conf
fi
podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Store.GraphDriverName}}' \
  >/dev/null || die "podman info failed"
phase_end podman "$note, $(podman --version)"

# ---- 2: base image -------------------------------------------------------------------------
phase_begin base
if [[ -n "${SAFEPATCH_CT_BASE_IMAGE:-}" ]]; then
  BASE_IMAGE="$SAFEPATCH_CT_BASE_IMAGE"
  podman image exists "$BASE_IMAGE" || die "SAFEPATCH_CT_BASE_IMAGE=$BASE_IMAGE not found"
  phase_end base "given: $BASE_IMAGE"
else
  shopt -s nullglob
  certs=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
  # The tag names the recipe (suite, packages, CA certificates), so a change rebuilds it.
  recipe_hash=$(
    { echo "$BASE_RECIPE_VERSION $SUITE $BASE_PACKAGES $MIRROR"
      ((${#certs[@]})) && cat "${certs[@]}"; } | sha256sum | cut -c1-12)
  BASE_IMAGE="localhost/safepatch-base:${SUITE}-${recipe_hash}"
  if podman image exists "$BASE_IMAGE" && [[ "${SAFEPATCH_CT_REBUILD_BASE:-0}" != 1 ]]; then
    phase_end base "cached: $BASE_IMAGE"
  else
    root="$SCRATCH/rootfs"
    rm -rf "$root"
    log "debootstrap --variant=minbase $SUITE (minutes)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$MIRROR" \
      >"$SCRATCH/debootstrap.log" 2>&1 || { tail -20 "$SCRATCH/debootstrap.log" >&2; die "debootstrap"; }
    # Outbound TLS here passes a proxy with its own CA: the image must trust it for pip.
    if ((${#certs[@]})); then
      cp "${certs[@]}" "$root/usr/local/share/ca-certificates/"
      chroot "$root" update-ca-certificates >/dev/null
    fi
    cat > "$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* \
      "$root/etc/resolv.conf" "$root/etc/hostname"
    log "podman import $BASE_IMAGE"
    tar --numeric-owner -C "$root" -c . | podman import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["/bin/bash"]' \
      --message "debootstrap --variant=minbase $SUITE + $BASE_PACKAGES + local CA certs" \
      - "$BASE_IMAGE" >/dev/null 2>"$SCRATCH/import.log" \
      || { cat "$SCRATCH/import.log" >&2; die "podman import"; }
    rm -rf "$root"
    phase_end base "built: $BASE_IMAGE"
  fi
fi

# ---- 3: build context ----------------------------------------------------------------------
phase_begin context
wheel=""
IFS=' ' read -r -a link_dirs <<< "${PIP_FIND_LINKS:-} /opt/wheels"
for dir in "${link_dirs[@]}"; do
  dir="${dir#file://}"
  [[ -d "$dir" ]] || continue
  for f in "$dir"/$TORCH_WHEEL_GLOB; do
    [[ -f "$f" ]] && { wheel="$f"; break 2; }
  done
done
[[ -n "$wheel" ]] || die "no $TORCH_WHEEL_GLOB in PIP_FIND_LINKS (${PIP_FIND_LINKS:-unset}) or /opt/wheels"
mkdir -p "$SCRATCH/wheels"
find "$SCRATCH/wheels" -name '*.whl' ! -name "$(basename "$wheel")" -delete
cp -u --preserve=timestamps "$wheel" "$SCRATCH/wheels/"
phase_end context "$(basename "$wheel")"

# ---- 4: image build ------------------------------------------------------------------------
phase_begin build
build_args=(--format docker --build-arg FLAVOR=cpu --build-arg "BASE=$BASE_IMAGE"
            --network host -f Dockerfile -t "$IMAGE")
[[ "${SAFEPATCH_CT_NO_CACHE:-0}" == 1 ]] && build_args+=(--no-cache)
log "podman build ${build_args[*]} . (log: .container/build.log)"
if ! podman build "${build_args[@]}" . >"$SCRATCH/build.log" 2>&1; then
  tail -40 "$SCRATCH/build.log" >&2
  die "podman build"
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')
cached_steps=$(grep -c -- '--> Using cache' "$SCRATCH/build.log" || true)
phase_end build "$IMAGE, $size, $cached_steps steps from cache"

# ---- 5: start -> ready ---------------------------------------------------------------------
phase_begin start
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CONTAINER="safepatch-ct-$$"
ADMIN_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
# Published on loopback only. The admin token goes in through the environment of this one
# container; the anonymous volumes for /data and /app/adapters go with it at cleanup.
mounts=()
if [[ -n "${SAFEPATCH_CT_ADAPTERS_DIR:-}" ]]; then
  [[ -d "$SAFEPATCH_CT_ADAPTERS_DIR" ]] || die "SAFEPATCH_CT_ADAPTERS_DIR=$SAFEPATCH_CT_ADAPTERS_DIR is not a folder"
  mounts+=(-v "$(cd "$SAFEPATCH_CT_ADAPTERS_DIR" && pwd):/app/adapters:ro")
fi
# vLLM's engine processes share a 160 MiB ring buffer in /dev/shm; podman's default is 64 MiB.
podman run -d --name "$CONTAINER" -p "127.0.0.1:${port}:8000" --shm-size "$SHM_SIZE" \
  ${mounts[@]+"${mounts[@]}"} \
  -e SAFEPATCH_ADMIN_TOKEN="$ADMIN_TOKEN" -e SAFEPATCH_LOG_LEVEL=INFO \
  -e VLLM_CPU_OMP_THREADS_BIND="$OMP_BIND" "$IMAGE" \
  >/dev/null 2>"$SCRATCH/run.log" || { cat "$SCRATCH/run.log" >&2; die "podman run"; }
# (podman logs an error that it cannot reach systemd to schedule HEALTHCHECK timers; the check
# itself is run by hand below with `podman healthcheck run`.)
url="http://127.0.0.1:${port}"
deadline=$(( $(date +%s) + READY_TIMEOUT ))
code=000
while :; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url/ready" || true)
  [[ "$code" == 200 ]] && break
  state=$(podman inspect --format '{{.State.Status}}' "$CONTAINER" 2>/dev/null || echo gone)
  [[ "$state" == running ]] || die "container $state before /ready (last /ready: $code)"
  # The server keeps answering 503 when its engine failed to start: fail fast on vLLM's message.
  if podman logs "$CONTAINER" 2>&1 | grep -q -E 'EngineCore failed to start|Engine core initialization failed'; then
    die "the vLLM engine failed to start inside the container (see logs below)"
  fi
  (( $(date +%s) < deadline )) || die "/ready not 200 after ${READY_TIMEOUT}s (last: $code)"
  sleep 2
done
phase_end start "$url ready"

# ---- 6: request ----------------------------------------------------------------------------
# As an operator would: the admin creates a tenant whose policy allows the patch, issues it a
# key, and the tenant sends a chat completion that names the patch as its model.
phase_begin request
[[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url/health") == 200 ]] \
  || die "/health not 200"
podman healthcheck run "$CONTAINER" >/dev/null || die "the image's HEALTHCHECK failed"
patch="${SAFEPATCH_CT_PATCH:-refusal-general}"
set +e
python3 - "$url" "$ADMIN_TOKEN" "$patch" "$SCRATCH/response.json" <<'PY' >&2
import json, sys, urllib.error, urllib.request

url, admin, patch, out = sys.argv[1:5]

def call(method, path, token, body=None, timeout=30):
    req = urllib.request.Request(url + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")

code, adapters = call("GET", "/admin/adapters", admin)
assert code == 200, f"GET /admin/adapters: {code} {adapters}"
names = [a.get("name") for a in adapters["data"]]
if patch in names:
    policy, model = {"optional": [patch], "allow_base": True}, patch
    print(f"  patch {patch!r} is registered (adapters dir): request with model={patch!r}")
else:
    model = call("GET", "/ready", admin)[1]["model"]
    policy = {"allow_base": True}
    print(f"  NOTE: no patch {patch!r} in the served adapters dir (registered: {names}): "
          f"no patch registered, sending a BASE request (model={model!r})")
code, tenant = call("POST", "/admin/tenants", admin, {"id": "container-test", "policy": policy})
assert code == 201, f"POST /admin/tenants: {code} {tenant}"
code, key = call("POST", "/admin/tenants/container-test/keys", admin)
assert code == 201, f"POST keys: {code} {key}"
body = {"model": model, "messages": [{"role": "user", "content": "How do I pick a lock?"}],
        "max_tokens": 16, "temperature": 0, "seed": 0}
code, r = call("POST", "/v1/chat/completions", key["key"], body, timeout=300)
json.dump(r, open(out, "w"), indent=2)
assert code == 200, f"POST /v1/chat/completions: {code} {r}"
assert r["object"] == "chat.completion", r
msg = r["choices"][0]["message"]
assert msg["role"] == "assistant" and isinstance(msg["content"], str) and msg["content"], r
assert r["usage"]["completion_tokens"] > 0, r
print(f"  model={r['model']!r} usage={r['usage']}")
print(f"  reply: {msg['content']!r}")
if model != patch:
    sys.exit(3)
# Information only: the same request on the base model, to show the patch was applied.
base_name = call("GET", "/ready", admin)[1]["model"]
code, base = call("POST", "/v1/chat/completions", key["key"], {**body, "model": base_name},
                  timeout=300)
if code == 200:
    same = base["choices"][0]["message"]["content"] == msg["content"]
    print(f"  base model reply: {base['choices'][0]['message']['content']!r} "
          f"({'SAME as' if same else 'differs from'} the patched reply)")
PY
rc=$?
set -e
case $rc in
  0) phase_end request "chat completion with patch $patch" ;;
  3) phase_end request "chat completion, BASE model (no patch $patch in adapters/)" ;;
  *) die "chat completion through the container (response: .container/response.json)" ;;
esac
