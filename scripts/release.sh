#!/usr/bin/env bash
# Tags a release of one module: MODULE/VERSION (see RELEASING.md).
#
#   scripts/release.sh MODULE VERSION        e.g. scripts/release.sh client-go v0.1.0
#   DRY_RUN=1 scripts/release.sh ...         check everything, tag nothing
#
# Checks, in order: VERSION is semver; MODULE is a releasable module; the work
# tree is clean; the tag does not exist; every sibling the module requires is
# at a released (tagged) version; every replace directive points at ../<sibling>;
# go.mod is tidy; the module's tests pass on its own go.mod (GOWORK=off) with
# its sibling modules at their tagged versions, as a consumer would build it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

ORDER="protocol → registry, storage → storage-file, storage-mysql → client-go → broker → benchmark, tools (tests is never released)"

module=${1:-${MODULE:-}}
version=${2:-${VERSION:-}}
dry_run=${DRY_RUN:-0}
[[ $dry_run == 0 ]] && dry_run=
[[ -n $module && -n $version ]] || die "usage: make release MODULE=<module dir> VERSION=vX.Y.Z[-pre] [DRY_RUN=1]"
module=${module#./}
module=${module%/}

cd "$ROOT"
problems=()
problem() { problems+=("$*"); }

# VERSION: vMAJOR.MINOR.PATCH with an optional pre-release; no build metadata.
semver='^v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$'
[[ $version =~ $semver ]] || die "VERSION '$version' is not semver vX.Y.Z or vX.Y.Z-pre (e.g. v0.1.0, v1.2.0-rc.1)"
major=${BASH_REMATCH[1]}

# MODULE: a module directory of this repository, and not tests.
is_module "$module" || die "MODULE '$module' is not a module directory (modules: $(all_modules | xargs))"
[[ $module != tests ]] || die "the tests module is never released (it only holds cross-module tests)"
modpath=$(cd "$module" && GOWORK=off go list -m -f '{{.Path}}')
want=$KITEQ_PREFIX/$module
((major >= 2)) && want=$want/v$major
[[ $modpath == "$want" ]] ||
	problem "module path of $module is $modpath; a $version tag needs module path $want"

tag=$module/$version
log "release: checking $tag (module $modpath)"

# Clean work tree: the tag must name exactly what was tested.
if [[ -n $(git status --porcelain) ]]; then
	git status --short | sed 's/^/  /'
	problem "the work tree is not clean (commit or stash the changes above)"
fi

if git rev-parse -q --verify "refs/tags/$tag" >/dev/null; then
	problem "tag $tag already exists ($(git rev-list -n 1 "$tag" | cut -c1-12)); a released version is never moved: pick a new VERSION"
fi

# Sibling requirements must be released versions: consumers outside this
# repository resolve them through the tags, not through the replace lines.
unreleased=0
siblings=()
while read -r path ver _; do
	[[ $path == "$KITEQ_PREFIX/"* ]] || continue
	sib=${path#"$KITEQ_PREFIX/"}
	if ! is_module "$sib"; then
		problem "$module requires $path $ver, which is not a module of this repository"
		continue
	fi
	if ! git rev-parse -q --verify "refs/tags/$sib/$ver" >/dev/null; then
		latest=$(git tag -l "$sib/v*" --sort=-v:refname | head -n 1)
		problem "$module requires $sib $ver: not released (no tag $sib/$ver); release $sib first, then \`go get $path@vA.B.C\` in $module${latest:+ (latest release: $latest)}"
		unreleased=1
	fi
	siblings+=("$sib/$ver")
done < <(gomod_requires "$module")

# replace directives: only "$KITEQ_PREFIX/X => ../X" for a sibling module X.
# go ignores replace lines of a dependency's go.mod, so these only serve work
# inside this repository; anything else would make the release differ from
# what was tested here.
while read -r old oldv new newv; do
	[[ -n $old ]] || continue
	sib=${old#"$KITEQ_PREFIX/"}
	if [[ $old != "$KITEQ_PREFIX/"* ]] || ! is_module "$sib" || [[ $sib == "$module" ]]; then
		problem "replace $old => $new: only sibling modules ($KITEQ_PREFIX/X => ../X) may be replaced"
		continue
	fi
	if [[ $oldv != - || $newv != - || $new != ../* ]] ||
		[[ $(realpath -m "$ROOT/$module/$new") != "$ROOT/$sib" ]]; then
		shown="$old$([[ $oldv == - ]] || printf ' %s' "$oldv") => $new$([[ $newv == - ]] || printf ' %s' "$newv")"
		problem "replace $shown: must be exactly '$old => $(realpath -m --relative-to="$ROOT/$module" "$ROOT/$sib")' (a directory of this repository, no versions)"
	fi
done < <(gomod_replaces "$module")

if ! (cd "$module" && go mod tidy -diff >/dev/null 2>&1); then
	problem "$module/go.mod or go.sum is not tidy (run 'go mod tidy' in $module; 'make tidy-check' shows the diff)"
fi

if ((${#problems[@]} > 0)); then
	printf 'release: cannot release %s:\n' "$tag" >&2
	printf '  - %s\n' "${problems[@]}" >&2
	((unreleased)) && printf 'release order (RELEASING.md): %s\n' "$ORDER" >&2
	exit 1
fi

# Test what a consumer gets: HEAD, with every sibling module the module requires
# put back to its tagged version (the replace lines point at those copies).
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
git archive HEAD | tar -x -C "$tree"
for t in "${siblings[@]}"; do
	sib=${t%/*}
	rm -rf "${tree:?}/$sib"
	git archive "$t" "$sib" | tar -x -C "$tree"
done
log "release: go test -race -count=1 ./... in $module at HEAD (GOWORK=off, its own go.mod)${siblings[*]:+, with ${siblings[*]}}"
if ! (cd "$tree/$module" && GOWORK=off go test -race -count=1 ./...); then
	((${#siblings[@]} > 0)) &&
		warn "the tests ran with ${siblings[*]}: if $module needs unreleased changes of a sibling, release that sibling first and 'go get' it in $module"
	die "tests of $module failed; not tagging $tag"
fi

commit=$(git rev-parse --short=12 HEAD)
if [[ -n $dry_run ]]; then
	log "release: DRY_RUN: all checks passed; would run: git tag -a $tag -m \"$module $version\"  (at $commit)"
	exit 0
fi
git tag -a "$tag" -m "$module $version"
log "release: tagged $tag at $commit"
log "release: publish it with: git push origin $tag"
