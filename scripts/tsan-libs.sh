#!/usr/bin/env bash
# Builds the two libraries Keel's threads synchronize through, libcaf_core 0.17.6 and Cap'n Proto
# / KJ 0.9.2, from Debian 12's own sources with -fsanitize=thread, into DIR/lib (default
# ../tsan-libs/lib beside the checkout), named as the Debian packages name them. A TSan build of
# Keel run with LD_LIBRARY_PATH=DIR/lib then sees every atomic and lock of CAF's mailboxes and
# scheduler and of KJ's cross-thread fulfillers: without them TSan reports thousands of races
# that are CAF's or KJ's own synchronization (bench/sanitizers.md). A developer tool: it fetches
# the two source packages from Debian's archive; nothing in the build or the tests uses it.
set -euo pipefail
dir=${1:-$(cd "$(dirname "$0")/../.." && pwd)/tsan-libs}
mkdir -p "$dir/src" "$dir/lib"
cd "$dir/src"
pool=http://deb.debian.org/debian/pool/main
fetch() { [ -s "$2" ] || curl -fsS -o "$2" "$pool/$1/$2"; }
fetch a/actor-framework actor-framework_0.17.6.orig.tar.gz
fetch c/capnproto capnproto_0.9.2.orig.tar.gz
echo "d03091e07b12dc53f9efbec4ea6fa63b  actor-framework_0.17.6.orig.tar.gz" | md5sum -c --quiet
echo "deb647e300ca3de92d2c1b33859f14e6  capnproto_0.9.2.orig.tar.gz" | md5sum -c --quiet
[ -d actor-framework-0.17.6 ] || tar xzf actor-framework_0.17.6.orig.tar.gz
[ -d capnproto-c++-0.9.2 ] || tar xzf capnproto_0.9.2.orig.tar.gz
flags=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
       "-DCMAKE_CXX_FLAGS=-fsanitize=thread -fno-omit-frame-pointer"
       -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread)
# CAF as Debian configures it (caf/detail/build_config.hpp: log level QUIET, nothing else).
cmake -S actor-framework-0.17.6 -B ../build-caf "${flags[@]}" -DCAF_LOG_LEVEL=QUIET \
  -DCAF_NO_EXAMPLES=ON -DCAF_NO_UNIT_TESTS=ON -DCAF_NO_OPENSSL=ON -DCAF_NO_TOOLS=ON \
  -DCAF_NO_PYTHON=ON -DCAF_NO_OPENCL=ON -DCAF_NO_BENCHMARKS=ON > /dev/null
ninja -C ../build-caf libcaf_core_shared
cmake -S capnproto-c++-0.9.2 -B ../build-capnp "${flags[@]}" -DBUILD_TESTING=OFF \
  -DBUILD_SHARED_LIBS=ON -DWITH_OPENSSL=ON > /dev/null
ninja -C ../build-capnp kj kj-async kj-tls capnp capnp-rpc
find ../build-caf -name 'libcaf_core.so.*' -type f -exec cp {} "$dir/lib/libcaf_core.so.0.17.6" \;
for n in kj kj-async kj-tls capnp capnp-rpc; do
  cp "$(find ../build-capnp -name "lib$n.so.*" -type f | head -1)" "$dir/lib/lib$n-0.9.2.so"
done
echo "tsan-libs: $dir/lib"; ls "$dir/lib"
