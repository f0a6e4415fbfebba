#!/usr/bin/env bash
# System packages the tests need beyond the venv: OpenSSH's server and rsync (tests/test_deploy.py
# runs `edgert deploy` against a real sshd on 127.0.0.1). Idempotent: installs only what is
# missing, with sudo when not root; does nothing when everything is already there.
set -euo pipefail

need=()
command -v rsync >/dev/null 2>&1 || need+=(rsync)
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1 || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "system_deps.sh: missing ${need[*]}, and this is not a Debian/Ubuntu system (no" \
         "apt-get): install them with the system's package manager" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "system_deps.sh: missing ${need[*]}; run as root or install sudo" >&2; exit 1; }
    sudo=(sudo)
fi
echo "system_deps.sh: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
