#!/usr/bin/env bash
# Make REMOTE_URL this checkout's default DVC remote, so `dvc push` / `dvc pull` share stage
# outputs (latents, trained models, samples) with the team. The URL goes into .dvc/config
# (commit it: everyone uses the same remote); credentials only ever into .dvc/config.local,
# which DVC keeps out of git.
#
#   infra/dvc/setup-remote.sh s3://bucket/rae                 # S3 or S3-compatible
#   infra/dvc/setup-remote.sh ssh://user@host/srv/dvc/rae     # SSH
#   infra/dvc/setup-remote.sh /mnt/shared/dvc/rae             # a shared file system
#
# Credentials are taken from the environment when set: AWS_PROFILE (S3), AWS_ENDPOINT_URL
# (S3-compatible servers such as MinIO; not a secret), DVC_SSH_KEYFILE (SSH). Without them
# DVC falls back to the usual AWS / SSH configuration of the user running it.
set -euo pipefail

if [ "$#" -lt 1 ] || [ -z "${1:-}" ]; then
  echo "usage: $0 REMOTE_URL [NAME]  (s3://bucket/path | ssh://user@host/path | /shared/path)" >&2
  exit 2
fi
url=$1
name=${2:-team}

cd "$(git rev-parse --show-toplevel)"
export DVC_NO_ANALYTICS=1
dvc=dvc
py=python3
if [ -x .venv/bin/dvc ]; then dvc=.venv/bin/dvc; py=.venv/bin/python; fi

if [ ! -d .dvc ]; then
  "$dvc" init --quiet
  echo "initialised DVC: commit .dvc/config and .dvc/.gitignore"
fi

# S3 and SSH support are DVC plugins that the project does not install by default.
need_plugin() {
  if ! "$py" -c "import $1" 2>/dev/null; then
    echo "$0: $2 remotes need the $3 plugin: $py -m pip install -c constraints.txt $3" >&2
    exit 1
  fi
}

case "$url" in
  s3://*)
    need_plugin dvc_s3 S3 dvc-s3
    "$dvc" remote add --default --force "$name" "$url"
    if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
      "$dvc" remote modify "$name" endpointurl "$AWS_ENDPOINT_URL"
    fi
    if [ -n "${AWS_PROFILE:-}" ]; then
      "$dvc" remote modify --local "$name" profile "$AWS_PROFILE"
    fi
    ;;
  ssh://*)
    need_plugin dvc_ssh SSH dvc-ssh
    "$dvc" remote add --default --force "$name" "$url"
    if [ -n "${DVC_SSH_KEYFILE:-}" ]; then
      "$dvc" remote modify --local "$name" keyfile "$DVC_SSH_KEYFILE"
    fi
    ;;
  *://*)
    echo "$0: unsupported remote URL $url (use s3://, ssh:// or a path)" >&2
    exit 2
    ;;
  *)
    mkdir -p "$url"
    "$dvc" remote add --default --force "$name" "$(cd "$url" && pwd)"
    ;;
esac

"$dvc" remote list
echo "default remote: $name. Share outputs with \`dvc push\`, fetch them with \`dvc pull\`."
