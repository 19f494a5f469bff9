#!/usr/bin/env bash
# Generates go.work from the modules found under the root.
#
#   scripts/gen-work.sh           write go.work
#   scripts/gen-work.sh --check   fail if go.work differs from a fresh generation
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

GO_VERSION=1.26

mode=generate
case ${1:-} in
"") ;;
--check) mode=check ;;
*) die "usage: $0 [--check]" ;;
esac

cd "$ROOT"
mapfile -t modules < <(all_modules)
((${#modules[@]} > 0)) || die "no go.mod found under $ROOT"

# Generate next to the real go.work so the use paths come out relative to the
# root, but under another name so the existing go.work is not read or touched.
tmp=$(mktemp "$ROOT/.go.work.XXXXXX")
trap 'rm -f "$tmp" "$tmp.sum"' EXIT
rm -f "$tmp"
uses=()
for m in "${modules[@]}"; do uses+=("./$m"); done
GOWORK=$tmp go work init
GOWORK=$tmp go work edit -go="$GO_VERSION" -toolchain=none
GOWORK=$tmp go work use "${uses[@]}"

if [[ $mode == generate ]]; then
	if [[ -f go.work ]] && cmp -s "$tmp" go.work; then
		log "go.work is up to date (${#modules[@]} modules: ${modules[*]})"
	else
		cp "$tmp" go.work
		log "wrote go.work (${#modules[@]} modules: ${modules[*]})"
	fi
	exit 0
fi

if [[ ! -f go.work ]]; then
	die "go.work is missing; run 'make work' and commit it"
fi
if ! cmp -s "$tmp" go.work; then
	diff -u --label 'go.work (committed)' --label 'go.work (generated)' go.work "$tmp" || true
	die "go.work is stale; run 'make work' and commit it"
fi
log "work-check: go.work lists all ${#modules[@]} modules: OK"
