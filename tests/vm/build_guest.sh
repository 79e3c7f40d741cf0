#!/usr/bin/env bash
# Builds the tiny Linux guest of the end-to-end VM test: OUT/vmlinuz and
# OUT/initramfs.cpio.gz, from Debian packages only (see tests/vm/README.md).
#
#   tests/vm/build_guest.sh OUT_DIR
#
# The kernel is the package linux-image-amd64 points at, busybox comes from
# busybox-static; both are fetched with `apt-get download` (nothing is installed) and
# unpacked with dpkg-deb; OUT/cache (or $OSR_GUEST_CACHE) keeps the few files used
# (about 10 MB). The initramfs holds
# busybox, the virtio modules needed to see a virtio-blk disk and a virtio-net NIC (in
# load order) and /init.
# Idempotent: packages are fetched and unpacked once; the outputs are rewritten only
# when their content changes.
#
# Needs: apt-get (with a fresh `apt-get update`), dpkg-deb, cpio, gzip.
set -euo pipefail

out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=${OSR_GUEST_CACHE:-$out/cache}
mkdir -p "$cache"

die() { echo "build_guest: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb cpio gzip; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install cpio gzip)"
done

# The versioned kernel package, e.g. linux-image-6.1.0-56-amd64.
find_kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
kernel_pkg=${OSR_GUEST_KERNEL_PKG:-$(find_kernel_pkg)}
if [ -z "$kernel_pkg" ] && [ "$(id -u)" -eq 0 ]; then
  # A machine whose package lists were never fetched (an image with everything
  # installed): fetch them once.
  echo "build_guest: apt does not know linux-image-amd64: apt-get update" >&2
  apt-get update -qq >&2 || die "apt-get update failed"
  kernel_pkg=$(find_kernel_pkg)
fi
[ -n "$kernel_pkg" ] || die "apt does not know linux-image-amd64; run apt-get update"

# Downloads package $1 and unpacks it into directory $2.
fetch() {
  local pkg=$1 dir=$2 dl
  dl=$(mktemp -d "$cache/dl.XXXXXX")
  echo "build_guest: downloading $pkg" >&2
  (cd "$dl" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
    true
  local deb
  deb=$(find "$dl" -maxdepth 1 -name '*.deb' | head -n1)
  [ -n "$deb" ] || die "apt-get download $pkg fetched nothing"
  mkdir -p "$dir"
  dpkg-deb -x "$deb" "$dir"
  rm -rf "$dl"
}

# The modules the guest needs, when the kernel has them as modules (not built in); their
# dependencies (e.g. net_failover and failover for virtio_net) come along. This list is
# the cache's .done marker, so changing it refreshes an old cache.
wanted="VIRTIO_PCI:virtio_pci VIRTIO_BLK:virtio_blk VIRTIO_NET:virtio_net"

# $cache/$kernel_pkg keeps only what the guest uses (the unpacked package is 400 MB):
# vmlinuz, config, modules/*.ko and modules.order (dependencies first).
kdir=$cache/$kernel_pkg
if [ "$(cat "$kdir/.done" 2>/dev/null)" != "$wanted" ]; then
  rm -rf "$kdir"
  tmp=$(mktemp -d "$cache/unpack.XXXXXX")
  fetch "$kernel_pkg" "$tmp"
  kver=$(find "$tmp/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n1)
  if [ -z "$kver" ] || [ ! -f "$tmp/boot/vmlinuz-$kver" ]; then die "no kernel in $kernel_pkg"; fi
  config=$tmp/boot/config-$kver
  # The package has no modules.dep (depmod runs at install time), so dependencies come
  # from each module's .modinfo "depends=" (NUL-separated strings).
  declare -A mod_path=()
  while IFS= read -r f; do
    name=${f##*/}
    name=${name%.ko}
    mod_path[${name//-/_}]=$f
  done < <(find "$tmp/lib/modules/$kver/kernel" -name '*.ko')
  declare -A seen=()
  order=()
  add_module() {
    local m=${1//-/_}
    [ -n "${seen[$m]:-}" ] && return
    local f=${mod_path[$m]:-}
    [ -n "$f" ] || die "module $m is not in $kernel_pkg"
    seen[$m]=1
    local deps d
    deps=$(tr '\0' '\n' <"$f" | grep -a '^depends=' | head -n1 | cut -d= -f2)
    for d in ${deps//,/ }; do add_module "$d"; done
    order+=("$m")
  }
  for opt_mod in $wanted; do
    opt=${opt_mod%%:*} mod=${opt_mod#*:}
    case $(grep "^CONFIG_$opt=" "$config" || true) in
      *=m) add_module "$mod" ;;
      *=y) ;;  # built in
      *) die "$kernel_pkg has no CONFIG_$opt" ;;
    esac
  done
  mkdir -p "$kdir/modules"
  cp "$tmp/boot/vmlinuz-$kver" "$kdir/vmlinuz"
  cp "$config" "$kdir/config"
  echo "$kver" >"$kdir/version"
  : >"$kdir/modules.order"
  for m in "${order[@]}"; do
    cp "${mod_path[$m]}" "$kdir/modules/$m.ko"
    echo "$m" >>"$kdir/modules.order"
  done
  rm -rf "$tmp"
  echo "$wanted" >"$kdir/.done"
fi
kver=$(cat "$kdir/version")

bbdir=$cache/busybox-static
if [ ! -f "$bbdir/.done" ]; then
  rm -rf "$bbdir"
  fetch busybox-static "$bbdir"
  touch "$bbdir/.done"
fi
busybox=$bbdir/bin/busybox
[ -x "$busybox" ] || die "no busybox in busybox-static"

# The initramfs tree.
stage=$(mktemp -d "$cache/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,data,out,tmp,etc,lib/modules}
cp "$busybox" "$stage/bin/busybox"
cp "$kdir"/modules/*.ko "$stage/lib/modules/" 2>/dev/null || true
cp "$kdir/modules.order" "$stage/etc/modules"

cat >"$stage/init" <<'EOF'
#!/bin/busybox sh
# The osr test guest. Reads osr.mode and its options from /proc/cmdline:
#   write: stores osr.text as hello.txt in a tar archive on /dev/vda, prints OSR-WROTE
#   read:  unpacks that archive, prints OSR-READ:<content of hello.txt>
#   auto:  read if the archive is there, else write
#   count: write a counter to the archive forever, printing OSR-COUNT:<n> (no power-off)
#   serve: read the archive if there is one (OSR-READ:<text>, OSR-NODATA, OSR-EMPTY when
#          there is no disk), then forever (no power-off): with osr.ip=A.B.C.D/NN put
#          eth0 on it and ping osr.peer every 2 s (OSR-PEER-OK:<peer>/OSR-PEER-FAIL:<peer>),
#          without it print OSR-ALIVE:<n> every 5 s
# Every mode first prints OSR-BOOTED; osr.mac_check=1 also prints OSR-MAC:<eth0's MAC>.
# Failures print OSR-ERROR:<what>. Except in count and serve, the guest then powers off.
echo "OSR-BOOTED"
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

finish() {
  sync
  poweroff -f
  sleep 5  # poweroff -f does not return; if it did, the kernel must not panic silently
  echo "OSR-ERROR:poweroff failed"
  exec sleep 3600
}
fail() { echo "OSR-ERROR:$*"; finish; }

while read -r m; do
  insmod "/lib/modules/$m.ko" || fail "insmod $m"
done </etc/modules

mode=''
text=''
ip=''
peer=''
mac_check=''
# shellcheck disable=SC2013 # words, not lines
for word in $(cat /proc/cmdline); do
  case $word in
    osr.mode=*) mode=${word#osr.mode=} ;;
    osr.text=*) text=${word#osr.text=} ;;
    osr.ip=*) ip=${word#osr.ip=} ;;
    osr.peer=*) peer=${word#osr.peer=} ;;
    osr.mac_check=*) mac_check=${word#osr.mac_check=} ;;
  esac
done

# Waits up to 5 s for eth0 (virtio_net registers it while insmod runs; this is a margin).
wait_eth0() {
  local i=0
  while [ ! -e /sys/class/net/eth0 ]; do
    i=$((i + 1))
    [ $i -le 50 ] || return 1
    sleep 0.1
  done
}
if [ "$mac_check" = 1 ]; then
  if wait_eth0; then
    echo "OSR-MAC:$(cat /sys/class/net/eth0/address)"
  else
    echo "OSR-MAC:none"
  fi
fi

# Waits up to 10 s for /dev/vda.
wait_disk() {
  local i=0
  while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -le 100 ] || return 1
    sleep 0.1
  done
}
# True when a virtio block device is attached (virtio device id 2).
has_disk() {
  local d
  for d in /sys/bus/virtio/devices/*/device; do
    [ "$(cat "$d" 2>/dev/null)" = 0x0002 ] && return 0
  done
  return 1
}

case $mode in
  write)
    wait_disk || fail "no /dev/vda after 10 s"
    printf '%s' "$text" >/data/hello.txt
    tar cf /dev/vda -C /data hello.txt || fail "tar cf /dev/vda"
    sync
    echo "OSR-WROTE"
    ;;
  read)
    wait_disk || fail "no /dev/vda after 10 s"
    tar xf /dev/vda -C /out || fail "tar xf /dev/vda"
    [ -f /out/hello.txt ] || fail "no hello.txt on /dev/vda"
    echo "OSR-READ:$(cat /out/hello.txt)"
    ;;
  auto)
    wait_disk || fail "no /dev/vda after 10 s"
    # First boot writes, later boots (e.g. after a failover) read what is there.
    if tar xf /dev/vda -C /out 2>/dev/null && [ -f /out/hello.txt ]; then
      echo "OSR-READ:$(cat /out/hello.txt)"
    else
      printf '%s' "$text" >/data/hello.txt
      tar cf /dev/vda -C /data hello.txt || fail "tar cf /dev/vda"
      sync
      echo "OSR-WROTE"
    fi
    ;;
  count)
    wait_disk || fail "no /dev/vda after 10 s"
    # Keeps writing: a counter in the archive, on the console each time it is on the
    # disk (tests that the guest's I/O goes on across a restart of its site daemon).
    # Never powers off by itself.
    i=0
    while :; do
      i=$((i + 1))
      printf '%s' "$i" >/data/hello.txt
      if tar cf /dev/vda -C /data hello.txt && sync; then
        echo "OSR-COUNT:$i"
      else
        echo "OSR-IOERROR:$i"
      fi
      sleep 0.3
    done
    ;;
  serve)
    # Reports what the disk holds, then stays up (no power-off, even after an error)
    # for network checks until qemu is stopped.
    if ! has_disk; then
      echo "OSR-EMPTY"
    elif ! wait_disk; then
      echo "OSR-ERROR:no /dev/vda after 10 s"
    elif ! dd if=/dev/vda of=/dev/null bs=64k count=1 2>/dev/null; then
      echo "OSR-ERROR:cannot read /dev/vda"
    elif tar xf /dev/vda -C /out 2>/dev/null && [ -f /out/hello.txt ]; then
      echo "OSR-READ:$(cat /out/hello.txt)"
    else
      # Zeros (a wiped or new disk) or anything else that is not the write mode's archive.
      echo "OSR-NODATA"
    fi
    if [ -n "$ip" ] && [ -z "$peer" ]; then
      echo "OSR-ERROR:osr.ip without osr.peer"
      ip=''
    fi
    if [ -n "$ip" ]; then
      if ! wait_eth0; then
        echo "OSR-ERROR:no eth0"
      elif ! ip link set eth0 up || ! ip addr add "$ip" dev eth0; then
        echo "OSR-ERROR:cannot put eth0 on $ip"
      fi
      while :; do
        if ping -c1 -W1 "$peer" >/dev/null 2>&1; then
          echo "OSR-PEER-OK:$peer"
        else
          echo "OSR-PEER-FAIL:$peer"
        fi
        sleep 2
      done
    fi
    i=0
    while :; do
      i=$((i + 1))
      echo "OSR-ALIVE:$i"
      sleep 5
    done
    ;;
  *) fail "osr.mode is '$mode', not write, read, auto, count or serve" ;;
esac
finish
EOF
chmod 755 "$stage/init"

# Writes stdin to $1 only when the content differs (keeps mtimes of unchanged outputs).
install_if_changed() {
  local dst=$1 tmp
  tmp=$(mktemp "$dst.XXXXXX")
  cat >"$tmp"
  if [ -f "$dst" ] && cmp -s "$tmp" "$dst"; then rm -f "$tmp"; else mv -f "$tmp" "$dst"; fi
}
find "$stage" -exec touch -h -d @0 {} +
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
  cpio --quiet -o -H newc -R 0:0 --reproducible | gzip -9 -n) |
  install_if_changed "$out/initramfs.cpio.gz"
install_if_changed "$out/vmlinuz" <"$kdir/vmlinuz"
install_if_changed "$out/kernel-version" <"$kdir/version"
chmod 644 "$out/vmlinuz" "$out/initramfs.cpio.gz" "$out/kernel-version"
echo "build_guest: $out/vmlinuz ($kver), $out/initramfs.cpio.gz" \
  "(modules: $(tr '\n' ' ' <"$kdir/modules.order"))" >&2
