#!/usr/bin/env bash
# Build the test control plane's binaries from the Go module proxy, cached between runs:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (Kubernetes $K8S_VERSION)
#   etcd ($ETCD_VERSION), kwok ($KWOK_VERSION) and helm ($HELM_VERSION, for the chart's tests)
# and, for the cluster tier's real node (tests/cluster): kubelet and kube-proxy (Kubernetes
# $K8S_VERSION) and CoreDNS ($COREDNS_VERSION).
# into $GPTQ_CONTROLPLANE_CACHE/<k8s version>/bin (default ~/.cache/gptq-operator/controlplane).
# Idempotent: binaries already built are kept. Prints the bin directory on its last line.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.12.4}
CACHE=${GPTQ_CONTROLPLANE_CACHE:-$HOME/.cache/gptq-operator/controlplane}
ROOT=$CACHE/$K8S_VERSION
BIN=$ROOT/bin
mkdir -p "$BIN"
export GOFLAGS=-mod=mod CGO_ENABLED=0

command -v go >/dev/null || { echo "go is not installed: install Go >= 1.24 (https://go.dev/dl) or Debian's golang" >&2; exit 3; }

log() { echo "[controlplane build $(date +%H:%M:%S)] $*" >&2; }
# Go's own chatter (module downloads) goes to $BUILD_LOG when given, one line per binary here
GO_LOG=${BUILD_LOG:-/dev/stderr}

# Kubernetes: a throwaway module that requires k8s.io/kubernetes and pins each staging
# module (k8s.io/api, k8s.io/client-go, ...) to the release of the same version, as the
# replace directives of Kubernetes' own go.mod point at ./staging, which a dependency
# cannot use.
k8s_bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)
missing=()
for b in "${k8s_bins[@]}"; do [[ -x $BIN/$b ]] || missing+=("$b"); done
if ((${#missing[@]})); then
  src=$ROOT/src/kubernetes
  mkdir -p "$src"
  cd "$src"
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" 2>>"$GO_LOG" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  staging=${K8S_VERSION/v1./v0.}
  {
    echo "module gptq-operator/controlplane-build"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//; s/\([0-9]*\.[0-9]*\).*/\1/')"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\t\1 => \1 '"$staging"'#p' "$gomod"
    echo ")"
  } > go.mod
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
  done
  for b in "${missing[@]}"; do
    log "building $b $K8S_VERSION"
    go build -trimpath -ldflags "$ldflags" -o "$BIN/$b" "k8s.io/kubernetes/cmd/$b" 2>>"$GO_LOG"
  done
fi

build_tool() {  # name module package version [extra ldflags]
  local name=$1 module=$2 pkg=$3 version=$4 extra=${5:-}
  [[ -x $BIN/$name ]] && return
  local src=$ROOT/src/$name
  mkdir -p "$src"
  cd "$src"
  printf 'module gptq-operator/%s-build\n\ngo 1.24\n\nrequire %s %s\n' "$name" "$module" "$version" > go.mod
  log "building $name $version"
  go build -trimpath -ldflags "-s -w $extra" -o "$BIN/$name" "$pkg" 2>>"$GO_LOG"
}
build_tool etcd go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3 "$ETCD_VERSION"  # server/v3 holds etcd's main package
build_tool kwok sigs.k8s.io/kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
# helm's release builds stamp its version and the Kubernetes version it assumes; so do we
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
helm_flags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
done
build_tool helm helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "$helm_flags"

build_tool coredns github.com/coredns/coredns github.com/coredns/coredns "$COREDNS_VERSION"

echo "$BIN"
