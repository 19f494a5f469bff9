#!/usr/bin/env bash
# Installs the tools that the build and its checks need, when they are missing
# or of another version. Idempotent: a second run installs nothing.
#
#   protoc          Debian's protobuf-compiler (3.21.x), via apt-get when root
#   protoc-gen-go   pinned version, into ./bin (GOBIN)
#   gcc             for `go test -race` (cgo), via apt-get when root
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_SERIES=3.21 # libprotoc 3.21.x is what the committed kiteq.pb.go records
BIN=$ROOT/bin

apt_updated=0
apt_install() {
	local pkgs=("$@")
	if ((EUID != 0)); then
		return 1
	fi
	log "install-tools: apt-get install -y ${pkgs[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y --no-install-recommends "${pkgs[@]}"; then
		((apt_updated)) && return 1
		log "install-tools: install failed; running apt-get update and retrying"
		apt-get update
		apt_updated=1
		apt-get install -y --no-install-recommends "${pkgs[@]}"
	fi
}

# protoc
if ! command -v protoc >/dev/null 2>&1; then
	apt_install protobuf-compiler ||
		die "protoc not found: install Debian's protobuf-compiler (protoc $PROTOC_SERIES.x), e.g. 'sudo apt-get install protobuf-compiler'"
fi
protoc_version=$(protoc --version | awk '{print $2}')
if [[ $protoc_version != "$PROTOC_SERIES".* ]]; then
	warn "protoc $protoc_version at $(command -v protoc): protocol/kiteq.pb.go is generated with protoc $PROTOC_SERIES.x" \
		"(Debian bookworm's protobuf-compiler); 'make proto' and 'make proto-check' will refuse to run"
else
	log "install-tools: protoc $protoc_version ($(command -v protoc)): ok"
fi

# protoc-gen-go, pinned, in ./bin
have=
if [[ -x $BIN/protoc-gen-go ]]; then
	have=$("$BIN/protoc-gen-go" --version 2>/dev/null | awk '{print $2}') || have=
fi
if [[ $have != "$PROTOC_GEN_GO_VERSION" ]]; then
	log "install-tools: go install google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION into $BIN${have:+ (found $have)}"
	GOBIN=$BIN GOWORK=off GOFLAGS=-buildvcs=false \
		go install "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
else
	log "install-tools: protoc-gen-go $have ($BIN/protoc-gen-go): ok"
fi

# A C compiler, for the race detector.
cc=$(go env CC)
if ! command -v "$cc" >/dev/null 2>&1; then
	apt_install gcc libc6-dev ||
		die "C compiler '$cc' not found: 'go test -race' needs cgo; install gcc (e.g. 'sudo apt-get install gcc')"
else
	log "install-tools: $cc ($(command -v "$cc")): ok"
fi
