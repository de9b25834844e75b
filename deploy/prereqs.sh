#!/usr/bin/env bash
# Installs what building berth needs and a fresh Debian machine may lack, and sets up the RocksDB
# build cache. Sourced by deploy/dev-cluster.sh and deploy/test.sh.
#
# - libclang (bindgen for RocksDB) and a C/C++ compiler, from Debian's packages;
# - protoc for etcd-client's build (berth's own protos use the one protoc-bin-vendored ships);
# - RocksDB's C++ takes about 15 minutes to compile on 2 cores, so it is compiled once into
#   $BERTH_CACHE/rocksdb/<librocksdb-sys version>-lz4/librocksdb.a and linked from there
#   (ROCKSDB_LIB_DIR + ROCKSDB_STATIC). Delete that folder to force a rebuild.
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v clang >/dev/null 2>&1 || need+=(clang)
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
  need+=(libclang-dev)
fi
command -v strip >/dev/null 2>&1 || need+=(binutils)
# etcd-client (the etcd side of `berth bench kv --target etcd`) compiles etcd's protos with protoc.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# The deploy tests check the systemd units with systemd-analyze.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# ...and bring up deploy/compose.yaml with docker-compose.
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing build prerequisites: ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust (rustup) first" >&2
  exit 1
fi

BERTH_CACHE="${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}"
rocksdb_version=$(grep -A1 '^name = "librocksdb-sys"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
rocksdb_dir="$BERTH_CACHE/rocksdb/${rocksdb_version}-lz4"
if [ ! -f "$rocksdb_dir/librocksdb.a" ]; then
  echo "compiling RocksDB ${rocksdb_version} once (about 15 minutes on 2 cores); cached in $rocksdb_dir" >&2
  build_dir="$rocksdb_dir.build"
  rm -rf "$build_dir"
  (unset ROCKSDB_LIB_DIR ROCKSDB_STATIC; CARGO_TARGET_DIR="$build_dir" cargo build -q -p berth-store)
  lib=$(ls -t "$build_dir"/debug/build/librocksdb-sys-*/out/librocksdb.a | head -n 1)
  mkdir -p "$rocksdb_dir"
  strip --strip-debug -o "$rocksdb_dir/librocksdb.a.tmp" "$lib"
  mv "$rocksdb_dir/librocksdb.a.tmp" "$rocksdb_dir/librocksdb.a"
  rm -rf "$build_dir"
fi
export ROCKSDB_LIB_DIR="$rocksdb_dir"
export ROCKSDB_STATIC=1
