#!/usr/bin/env bash
# Regenerates protocol/kiteq.pb.go from protocol/kiteq.proto.
#
#   scripts/proto.sh           regenerate in place
#   scripts/proto.sh --check   regenerate into a temporary copy; fail on any diff
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

PROTOC_SERIES=3.21
PROTO_DIR=protocol
PROTO=kiteq.proto
GENERATED=kiteq.pb.go

mode=generate
case ${1:-} in
"") ;;
--check) mode=check ;;
*) die "usage: $0 [--check]" ;;
esac

cd "$ROOT"
[[ -f $PROTO_DIR/$PROTO ]] || die "$PROTO_DIR/$PROTO not found"
"$ROOT/scripts/install-tools.sh" >/dev/null
protoc_version=$(protoc --version | awk '{print $2}')
if [[ $protoc_version != "$PROTOC_SERIES".* ]]; then
	die "protoc $protoc_version ($(command -v protoc)) is not $PROTOC_SERIES.x: it would rewrite the header" \
		"of $PROTO_DIR/$GENERATED; install Debian bookworm's protobuf-compiler (3.21.12) or put protoc $PROTOC_SERIES.x first in PATH"
fi

# generate DIR: runs protoc inside DIR, which holds a copy of $PROTO.
generate() {
	(cd "$1" && protoc --plugin=protoc-gen-go="$ROOT/bin/protoc-gen-go" \
		--go_out=. --go_opt=paths=source_relative "$PROTO")
}

if [[ $mode == generate ]]; then
	generate "$PROTO_DIR"
	log "proto: regenerated $PROTO_DIR/$GENERATED (protoc $protoc_version, $("$ROOT/bin/protoc-gen-go" --version))"
	exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$PROTO_DIR/$PROTO" "$tmp/"
generate "$tmp"
if ! cmp -s "$PROTO_DIR/$GENERATED" "$tmp/$GENERATED"; then
	mkdir -p "$tmp/a" "$tmp/b"
	cp "$PROTO_DIR/$GENERATED" "$tmp/a/$GENERATED"
	cp "$tmp/$GENERATED" "$tmp/b/$GENERATED"
	(cd "$tmp" && git --no-pager diff --no-index --stat a/$GENERATED b/$GENERATED) || true
	(cd "$tmp" && git --no-pager diff --no-index a/$GENERATED b/$GENERATED | head -n 60) || true
	die "$PROTO_DIR/$GENERATED is out of date with $PROTO_DIR/$PROTO (a: committed, b: regenerated); run 'make proto' and commit it"
fi
log "proto-check: $PROTO_DIR/$GENERATED matches $PROTO_DIR/$PROTO (protoc $protoc_version, $("$ROOT/bin/protoc-gen-go" --version)): OK"
