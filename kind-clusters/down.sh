#!/usr/bin/env bash
# Deletes the kind clusters up.sh made (isthmus1..3) and its work directory.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v kind > /dev/null || {
  echo "error: kind is not installed" >&2
  exit 1
}
for name in isthmus1 isthmus2 isthmus3; do
  if kind get clusters 2> /dev/null | grep -x "$name" > /dev/null; then
    kind delete cluster --name "$name"
  fi
done
rm -rf "${ISTHMUS_KIND_WORK:-$HERE/.work}"
