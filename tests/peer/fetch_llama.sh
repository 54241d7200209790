#!/usr/bin/env bash
# fetch_llama.sh DEST
#
# Puts the llama.cpp peer (prebuilt CPU libraries + matching headers and source) into DEST,
# using only the npm registry:
#   node-llama-cpp@3.22.1              -> llama/gitRelease.bundle (llama.cpp source, 2026-09-28)
#   @node-llama-cpp/linux-x64@3.22.1   -> bins/linux-x64/ (libllama, libggml*, CPU variants)
# Nothing from these packages is ever copied into the repository.
#
# Layout written under DEST:
#   dl/                                   the two npm tarballs while fetching (npm pack; npm checks
#                                         their integrity); removed once DEST is complete
#   node_modules/node-llama-cpp/          extracted package (same layout as npm install gives)
#   node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/   <- LIB dir
#   llama.cpp/                            git clone of the bundle (headers, source, tools)
#   include/                              flat copy of llama.h, llama-cpp.h, ggml*.h, gguf.h <- INCLUDE dir
#   peer.env                              KEY=VALUE summary, written last (= "install complete")
#
# Prints (stdout) MOE_PEER_INCLUDE_DIR=... and MOE_PEER_LIB_DIR=... ; progress goes to stderr.
# Idempotent: a second run with a complete DEST does no network access and takes well under a second.
# Needs: bash, npm, node, git, tar, gzip, grep, sed. Linux x86-64 only (that is what the binaries are).
set -euo pipefail

PKG_VERSION=3.22.1
PKG_MAIN=node-llama-cpp
PKG_BINS=@node-llama-cpp/linux-x64
STAMP_FORMAT=1

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[fetch_llama] $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 DEST"
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) die "prebuilt peer libraries exist only for Linux x86-64 (this is $(uname -s)-$(uname -m))" ;;
esac

mkdir -p "$1"
DEST=$(cd "$1" && pwd -P)
MAIN_DIR="$DEST/node_modules/node-llama-cpp"
BINS_PKG_DIR="$DEST/node_modules/@node-llama-cpp/linux-x64"
LIB_DIR="$BINS_PKG_DIR/bins/linux-x64"
SRC_DIR="$DEST/llama.cpp"
INC_DIR="$DEST/include"
ENV_FILE="$DEST/peer.env"

print_result() {
    echo "MOE_PEER_INCLUDE_DIR=$INC_DIR"
    echo "MOE_PEER_LIB_DIR=$LIB_DIR"
}

# ---- fast path: complete install of this exact version --------------------------------------
if [ -f "$ENV_FILE" ] \
   && grep -qx "PEER_STAMP_FORMAT=$STAMP_FORMAT" "$ENV_FILE" \
   && grep -qx "NODE_LLAMA_CPP_VERSION=$PKG_VERSION" "$ENV_FILE" \
   && [ -f "$INC_DIR/llama.h" ] && [ -f "$SRC_DIR/include/llama.h" ] && [ -d "$LIB_DIR" ]; then
    lib=$(sed -n 's/^LLAMA_LIB=//p' "$ENV_FILE")
    if [ -n "$lib" ] && [ -f "$lib" ]; then
        log "already present in $DEST ($(sed -n 's/^LLAMA_VERSION=//p' "$ENV_FILE"))"
        print_result
        exit 0
    fi
fi

for tool in npm git tar gzip; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (on Debian: apt-get install -y nodejs npm git)"
done
rm -f "$ENV_FILE"   # not complete until we rewrite it at the end

# ---- 1. the two npm packages (npm pack: exact tarballs, no dependency tree, no install scripts) --
# (npm install would also pull ~115 JS dependencies of node-llama-cpp and try to run its
#  postinstall; we need only the two tarballs' files.)
fetch_pkg() {   # spec tarball-name target-dir
    local spec=$1 tgz=$2 dir=$3
    if [ -f "$dir/package.json" ] && grep -q "\"version\": *\"$PKG_VERSION\"" "$dir/package.json"; then
        return 0
    fi
    mkdir -p "$DEST/dl"
    if [ ! -s "$DEST/dl/$tgz" ]; then
        log "npm pack $spec"
        (cd "$DEST/dl" && npm pack --silent --no-fund --no-audit "$spec" >/dev/null) \
            || die "npm pack $spec failed"
        [ -s "$DEST/dl/$tgz" ] || die "npm pack $spec did not produce $tgz"
    fi
    local tmp="$dir.tmp.$$"
    rm -rf "$tmp" && mkdir -p "$tmp"
    tar -xzf "$DEST/dl/$tgz" -C "$tmp" || die "cannot extract $tgz"
    [ -f "$tmp/package/package.json" ] || die "$tgz has no package/package.json"
    rm -rf "$dir" && mkdir -p "$(dirname "$dir")"
    mv "$tmp/package" "$dir" && rm -rf "$tmp"
}
fetch_pkg "$PKG_MAIN@$PKG_VERSION" "node-llama-cpp-$PKG_VERSION.tgz" "$MAIN_DIR"
fetch_pkg "$PKG_BINS@$PKG_VERSION" "node-llama-cpp-linux-x64-$PKG_VERSION.tgz" "$BINS_PKG_DIR"

BUNDLE="$MAIN_DIR/llama/gitRelease.bundle"
[ -f "$BUNDLE" ] || die "$BUNDLE missing"
[ -d "$LIB_DIR" ] || die "$LIB_DIR missing"

# ---- 2. llama.cpp source from the bundle --------------------------------------------------------
BUNDLE_HEAD=$(git bundle list-heads "$BUNDLE" | awk '$2=="HEAD"{print $1; exit}')
[ -n "$BUNDLE_HEAD" ] || BUNDLE_HEAD=$(git bundle list-heads "$BUNDLE" | awk 'NR==1{print $1}')
[ -n "$BUNDLE_HEAD" ] || die "cannot read heads of $BUNDLE"
if [ ! -f "$SRC_DIR/include/llama.h" ] || [ ! -f "$SRC_DIR/ggml/CMakeLists.txt" ] \
   || [ "$(git -C "$SRC_DIR" rev-parse HEAD 2>/dev/null)" != "$BUNDLE_HEAD" ]; then
    log "git clone $BUNDLE -> $SRC_DIR"
    rm -rf "$SRC_DIR" "$SRC_DIR.tmp.$$"
    git -c advice.detachedHead=false clone --quiet "$BUNDLE" "$SRC_DIR.tmp.$$" || die "git clone of the bundle failed"
    mv "$SRC_DIR.tmp.$$" "$SRC_DIR"
fi
[ -f "$SRC_DIR/include/llama.h" ] || die "$SRC_DIR/include/llama.h missing"

# ---- 3. flat include dir ------------------------------------------------------------------------
rm -rf "$INC_DIR.tmp.$$" && mkdir -p "$INC_DIR.tmp.$$"
cp "$SRC_DIR"/include/*.h "$SRC_DIR"/ggml/include/*.h "$INC_DIR.tmp.$$/"
rm -rf "$INC_DIR" && mv "$INC_DIR.tmp.$$" "$INC_DIR"

# ---- 4. versions: headers (bundle) vs prebuilt libraries ---------------------------------------
cmake_ver() {   # file prefix  -> MAJOR.MINOR.PATCH from set(PREFIX_VERSION_MAJOR n) ...
    local f=$1 p=$2 maj min pat
    maj=$(sed -n "s/^set(${p}_VERSION_MAJOR \([0-9]*\))/\1/p" "$f")
    min=$(sed -n "s/^set(${p}_VERSION_MINOR \([0-9]*\))/\1/p" "$f")
    pat=$(sed -n "s/^set(${p}_VERSION_PATCH \([0-9]*\))/\1/p" "$f")
    [ -n "$maj" ] && [ -n "$min" ] && [ -n "$pat" ] || die "cannot read ${p}_VERSION from $f"
    echo "$maj.$min.$pat"
}
json_str() {    # file key -> first "key": "value"
    sed -n "s/.*\"$2\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" "$1" | head -n 1
}
LLAMA_VERSION=$(cmake_ver "$SRC_DIR/CMakeLists.txt" LLAMA)
GGML_VERSION=$(cmake_ver "$SRC_DIR/ggml/CMakeLists.txt" GGML)
BUNDLE_TAG=$(json_str "$MAIN_DIR/llama/llama.cpp.info.json" tag)
BINS_RELEASE=$(json_str "$LIB_DIR/_nlcBuildMetadata.json" release)
BINS_GPU=$(sed -n 's/.*"gpu":\([a-z]*\).*/\1/p' "$LIB_DIR/_nlcBuildMetadata.json")
BINS_PKG_VERSION=$(json_str "$BINS_PKG_DIR/package.json" version)

[ "$BINS_PKG_VERSION" = "$PKG_VERSION" ] || die "binaries package is $BINS_PKG_VERSION, expected $PKG_VERSION"
[ -n "$BUNDLE_TAG" ] && [ "$BUNDLE_TAG" = "$BINS_RELEASE" ] \
    || die "source bundle tag '$BUNDLE_TAG' != prebuilt libraries' llama.cpp release '$BINS_RELEASE'"
[ "$BUNDLE_TAG" = "v$LLAMA_VERSION" ] \
    || die "source bundle tag '$BUNDLE_TAG' != llama.cpp version in its CMakeLists.txt ($LLAMA_VERSION)"
[ "$BINS_GPU" = "false" ] || die "expected a CPU-only build in $LIB_DIR (gpu=$BINS_GPU)"

pick_lib() {    # glob -> the single matching file
    # shellcheck disable=SC2206  # the glob is meant to expand
    local m=("$LIB_DIR"/$1)
    [ ${#m[@]} -eq 1 ] && [ -f "${m[0]}" ] || die "expected exactly one $1 in $LIB_DIR"
    echo "${m[0]}"
}
LLAMA_LIB=$(pick_lib 'libllama.v*.so')
GGML_LIB=$(pick_lib 'libggml.v*.so')
GGML_BASE_LIB=$(pick_lib 'libggml-base.so')
ls "$LIB_DIR"/libggml-cpu-*.so >/dev/null 2>&1 || die "no CPU backend variants (libggml-cpu-*.so) in $LIB_DIR"

# Version strings compiled into the libraries (LLAMA_VERSION into libllama, GGML_VERSION and the
# short upstream commit into libggml-base). llama_peer --version checks the same at run time.
grep -aqF "$LLAMA_VERSION" "$LLAMA_LIB" || die "$LLAMA_LIB does not contain version $LLAMA_VERSION"
grep -aqF "$GGML_VERSION" "$GGML_BASE_LIB" || die "$GGML_BASE_LIB does not contain ggml version $GGML_VERSION"
# ggml_commit() is stored right after the ggml_version() string ("0.25.1\0<short sha>\0").
GGML_COMMIT=$(tr '\0' '\n' < "$GGML_BASE_LIB" | grep -A1 -xF "$GGML_VERSION" | sed -n '2p' \
              | grep -xE '[0-9a-f]{7,40}(-dirty)?' || true)
BUNDLE_SUBJECT=$(git -C "$SRC_DIR" log -1 --format=%B | grep -v '^##' | grep -v '^$' | head -n 1)
BUNDLE_DATE=$(git -C "$SRC_DIR" log -1 --format=%cs)

# ---- 5. summary (written last: its presence means the install is complete) ---------------------
cat > "$ENV_FILE.tmp" <<EOF
PEER_STAMP_FORMAT=$STAMP_FORMAT
NODE_LLAMA_CPP_VERSION=$PKG_VERSION
LLAMA_RELEASE_TAG=$BUNDLE_TAG
LLAMA_VERSION=$LLAMA_VERSION
GGML_VERSION=$GGML_VERSION
GGML_BUILD_COMMIT=${GGML_COMMIT:-unknown}
BUNDLE_COMMIT=$BUNDLE_HEAD
BUNDLE_DATE=$BUNDLE_DATE
BUNDLE_SUBJECT=$BUNDLE_SUBJECT
INCLUDE_DIR=$INC_DIR
LIB_DIR=$LIB_DIR
SRC_DIR=$SRC_DIR
LLAMA_LIB=$LLAMA_LIB
GGML_LIB=$GGML_LIB
GGML_BASE_LIB=$GGML_BASE_LIB
EOF
mv "$ENV_FILE.tmp" "$ENV_FILE"
rm -rf "$DEST/dl"   # 45 MB; npm's own cache still has the tarballs
log "llama.cpp $BUNDLE_TAG (llama $LLAMA_VERSION, ggml $GGML_VERSION @ ${GGML_COMMIT:-unknown}; bundle $BUNDLE_HEAD, $BUNDLE_DATE)"
print_result
