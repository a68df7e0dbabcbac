#!/usr/bin/env bash
# Build the platform image (infra/docker/Dockerfile) tagged by the git commit it is built from,
# and push it when a registry repository is given. The tag is immutable: a node that has it
# runs exactly that commit, so `imagePullPolicy: IfNotPresent` never runs stale code.
#
#   infra/docker/build.sh                                        # rae-platform:<commit>, local
#   infra/docker/build.sh registry.example.com/rae/rae-platform   # built and pushed
#   eval "$(infra/docker/build.sh registry.example.com/rae/rae-platform | tail -1)"
#
# The last line it prints is `export RAE_IMAGE=... RAE_IMAGE_TAG=...` for the manifests
# (envsubst) and the compose files.
set -euo pipefail

if [ "$#" -gt 1 ]; then
  echo "usage: $0 [REGISTRY/REPOSITORY]  (default: rae-platform, built locally, not pushed)" >&2
  exit 2
fi
repo=${1:-rae-platform}
cd "$(git rev-parse --show-toplevel)"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "$0: the working tree has uncommitted changes; commit them first: the tag names a commit" >&2
  exit 2
fi
commit=$(git rev-parse HEAD)
tag=${commit:0:12}
docker build -f infra/docker/Dockerfile --build-arg "GIT_COMMIT=$commit" -t "$repo:$tag" .
if [ "$repo" != rae-platform ]; then
  docker push "$repo:$tag"
fi
echo "export RAE_IMAGE=$repo:$tag RAE_IMAGE_TAG=$tag"
