#!/usr/bin/env bash
# Builds the Isthmus lab on kind: 2 or 3 clusters (multi-primary, one network per
# cluster, joined only through east-west gateways), then drives requests from
# productpage in cluster1 to reviews and prints where they landed.
#
#   kind-clusters/up.sh [2|3]        (default 2; kind-clusters/down.sh removes it)
#
# Needs docker, kind and kubectl. NOT RUN on this project's machines (no Docker engine):
# see kind-clusters/README.md for what is and is not verified.
# envsubst's variable lists are single-quoted on purpose: envsubst expands them itself.
# shellcheck disable=SC2016
set -euo pipefail

N="${1:-2}"
case "$N" in
  2 | 3) ;;
  *)
    echo "usage: $0 [2|3]   (number of kind clusters)" >&2
    exit 2
    ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
IMAGE=isthmus:dev
WORK="${ISTHMUS_KIND_WORK:-$HERE/.work}"
WAIT=180s
REQUESTS="${REQUESTS:-30}"

step() { printf '\n==> %s\n' "$*"; }
die() {
  echo "error: $*" >&2
  exit 1
}

for tool in docker kind kubectl envsubst base64; do
  command -v "$tool" > /dev/null || die "$tool is not installed (this script needs docker, kind, kubectl and envsubst from gettext)"
done
docker info > /dev/null 2>&1 || die "the Docker engine is not reachable (is it running? may you use it?)"

CLUSTERS=()
for k in $(seq 1 "$N"); do CLUSTERS+=("cluster$k"); done
LAST="cluster$N"

ctx() { echo "kind-isthmus${1#cluster}"; }
kc() {
  local c="$1"
  shift
  kubectl --context "$(ctx "$c")" "$@"
}
node_ip() {
  docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "isthmus${1#cluster}-control-plane"
}
# Fills a manifest's placeholders for cluster $1 (only the named variables: any other
# `$` in a file is left alone) and applies it there.
apply() {
  local c="$1" file="$2"
  CLUSTER="$c" NETWORK="network${c#cluster}" GATEWAY_IP="${GATEWAY_IP:-}" \
    envsubst '${CLUSTER} ${NETWORK} ${GATEWAY_IP}' < "$HERE/manifests/$file" | kc "$c" apply -f -
}
# A kubeconfig for cluster $1's API at $2 with the token of service account $3.
kubeconfig() {
  local c="$1" server="$2" sa="$3" token ca
  token="$(kc "$c" -n istio-system get secret "$sa-token" -o jsonpath='{.data.token}' | base64 -d)"
  ca="$(kc "$c" -n istio-system get secret "$sa-token" -o jsonpath='{.data.ca\.crt}')"
  KUBE_CLUSTER="$c" KUBE_SERVER="$server" KUBE_CA_DATA="$ca" KUBE_TOKEN="$token" \
    envsubst '${KUBE_CLUSTER} ${KUBE_SERVER} ${KUBE_CA_DATA} ${KUBE_TOKEN}' < "$HERE/kubeconfig.yaml"
}

step "kind clusters: ${CLUSTERS[*]}"
for c in "${CLUSTERS[@]}"; do
  name="isthmus${c#cluster}"
  if kind get clusters 2> /dev/null | grep -x "$name" > /dev/null; then
    echo "$name exists; kept"
  else
    kind create cluster --config "$HERE/$c.yaml" --name "$name" --wait "$WAIT"
  fi
done

step "image $IMAGE (release build of the workspace; the first build takes a while)"
DOCKER_BUILDKIT=1 docker build -f "$HERE/Dockerfile" -t "$IMAGE" "$ROOT"
for c in "${CLUSTERS[@]}"; do
  kind load docker-image "$IMAGE" --name "isthmus${c#cluster}"
done

step "mesh CA: one root, an intermediate per cluster, workload tokens ($WORK)"
mkdir -p "$WORK/ca" "$WORK/tokens"
in_image() { docker run --rm --user "$(id -u):$(id -g)" -v "$WORK:/work" "$IMAGE" "$@"; }
in_image federation-controller ca init-mesh --out /work/ca --clusters "$(
  IFS=,
  echo "${CLUSTERS[*]}"
)"
for c in "${CLUSTERS[@]}"; do
  for sa in reviews productpage; do
    # Also makes the cluster's bootstrap-key, which goes into its cacerts Secret.
    in_image federation-controller ca token --ca-dir "/work/ca/$c" \
      --identity "spiffe://cluster.local/ns/default/sa/$sa" > "$WORK/tokens/$c-$sa"
  done
done

step "namespaces, controller RBAC and service-account tokens"
for c in "${CLUSTERS[@]}"; do
  apply "$c" namespace.yaml
  apply "$c" controller.yaml
done
for c in "${CLUSTERS[@]}"; do
  for sa in isthmus-controller isthmus-reader; do
    ok=
    for _ in $(seq 1 60); do
      if [ -n "$(kc "$c" -n istio-system get secret "$sa-token" -o jsonpath='{.data.token}' 2> /dev/null)" ]; then
        ok=1
        break
      fi
      sleep 1
    done
    [ -n "$ok" ] || die "$c: the token of $sa was not issued within 60 s"
  done
done

step "secrets: cacerts, the controller's own kubeconfig, remote secrets, workload tokens"
for c in "${CLUSTERS[@]}"; do
  d="$WORK/ca/$c"
  kc "$c" -n istio-system create secret generic cacerts \
    --from-file=ca-cert.pem="$d/ca-cert.pem" --from-file=ca-key.pem="$d/ca-key.pem" \
    --from-file=cert-chain.pem="$d/cert-chain.pem" --from-file=root-cert.pem="$d/root-cert.pem" \
    --from-file=bootstrap-key="$d/bootstrap-key" \
    --dry-run=client -o yaml | kc "$c" apply -f -
  kubeconfig "$c" https://kubernetes.default.svc isthmus-controller > "$WORK/$c-own.kubeconfig"
  kc "$c" -n istio-system create secret generic isthmus-own-kubeconfig \
    --from-file=kubeconfig="$WORK/$c-own.kubeconfig" --dry-run=client -o yaml | kc "$c" apply -f -
  for sa in reviews productpage; do
    kc "$c" -n default create secret generic "isthmus-workload-$sa" \
      --from-file=token="$WORK/tokens/$c-$sa" --from-file=root-cert.pem="$WORK/ca/root-cert.pem" \
      --dry-run=client -o yaml | kc "$c" apply -f -
  done
done
for remote in "${CLUSTERS[@]}"; do
  kubeconfig "$remote" "https://$(node_ip "$remote"):6443" isthmus-reader > "$WORK/$remote-reader.kubeconfig"
  b64="$(base64 < "$WORK/$remote-reader.kubeconfig" | tr -d '\n')"
  for c in "${CLUSTERS[@]}"; do
    [ "$c" = "$remote" ] && continue
    REMOTE="$remote" REMOTE_KUBECONFIG_B64="$b64" \
      envsubst '${REMOTE} ${REMOTE_KUBECONFIG_B64}' < "$HERE/manifests/remote-secret.yaml" | kc "$c" apply -f -
  done
done

step "gateways and bookinfo (reviews-v2 in $LAST only)"
for c in "${CLUSTERS[@]}"; do
  GATEWAY_IP="$(node_ip "$c")" apply "$c" eastwest-gateway.yaml
  apply "$c" bookinfo.yaml
done
apply "$LAST" reviews-v2.yaml

step "waiting for rollouts (at most $WAIT each)"
for c in "${CLUSTERS[@]}"; do
  for d in istio-system/isthmus-controller istio-system/istio-eastwestgateway default/reviews-v1 default/productpage; do
    kc "$c" -n "${d%%/*}" rollout status "deployment/${d#*/}" --timeout "$WAIT" ||
      die "$c: $d did not become ready; look at: kubectl --context $(ctx "$c") -n ${d%%/*} describe deployment ${d#*/}; kubectl --context $(ctx "$c") -n ${d%%/*} logs deployment/${d#*/} --all-containers"
  done
done
kc "$LAST" -n default rollout status deployment/reviews-v2 --timeout "$WAIT"

call() {
  kc cluster1 -n default exec deploy/productpage -c productpage -- \
    curl -fsS --max-time 5 http://reviews.default.svc.cluster.local:9080/
}
step "first call from productpage in cluster1 to reviews (at most 60 s)"
ok=
for _ in $(seq 1 30); do
  if call > /dev/null 2>&1; then
    ok=1
    break
  fi
  sleep 2
done
[ -n "$ok" ] || die "productpage could not reach reviews within 60 s; look at the sidecars: kubectl --context $(ctx cluster1) logs deploy/productpage -c isthmus-proxy"

step "traffic: $REQUESTS requests from productpage in cluster1 to reviews"
out="$WORK/traffic.txt"
: > "$out"
failed=0
for _ in $(seq 1 "$REQUESTS"); do
  if body="$(call)"; then
    cluster="$(grep -o '"ISTHMUS_CLUSTER": *"[^"]*"' <<< "$body" | head -n1 | cut -d'"' -f4 || true)"
    version="$(grep -o '"ISTHMUS_VERSION": *"[^"]*"' <<< "$body" | head -n1 | cut -d'"' -f4 || true)"
    caller="$(grep -o 'URI=spiffe://[^;",]*' <<< "$body" | head -n1 || true)"
    echo "${cluster:-?} ${version:-?} ${caller:-no-xfcc}" >> "$out"
  else
    failed=$((failed + 1))
  fi
done
echo "landed (count, cluster, version, caller identity seen by reviews):"
sort "$out" | uniq -c
echo "failed: $failed of $REQUESTS"
for c in "${CLUSTERS[@]}"; do
  [ "$c" = cluster1 ] && continue
  echo "$c's gateway, connections carried (istio_tcp_connections_opened_total):"
  kc "$c" -n istio-system exec deploy/istio-eastwestgateway -- bash -c \
    'exec 3<>/dev/tcp/127.0.0.1/15090 && printf "GET /stats/prometheus HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2> /dev/null |
    grep '^istio_tcp_connections_opened_total' || echo "  (none, or metrics unreadable)"
done
[ "$failed" -eq 0 ] || die "$failed requests failed"
