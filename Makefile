# miio_client: host build and tests, fully static board builds, install into a root file system.
# `make help` lists the targets. README.md ("Static builds", "Install", "Init script") explains them.

CARGO     ?= cargo
TEST_ARGS ?=
PREFIX    ?= /usr
DESTDIR   ?=
# install: a binary to install instead of the host release build (e.g. target/static/armv7/miio_client).
STATIC    ?=
# install: applet names to link; empty means ask the binary (`miio_client --list-applets`, see
# .ci/list-applets), which links none but miio_client itself while the binary lacks that flag.
APPLETS   ?=
# static: board architecture (x86_64, aarch64, armv7, mipsel or s390x); FEATURES: the optional parts to build in
# (cargo features, BusyBox style; the device features by default); FAKECLOUD=1 adds the fake cloud.
TARGET    ?= x86_64
FEATURES  ?= agent mqtt ota
FAKECLOUD ?=

.DEFAULT_GOAL := all
.PHONY: all test run check-features static static-test static-glue static-deps static-musl static-packages install clean fmt-check clippy help

help:
	@echo 'make                  host release build (target/release/miio_client)'
	@echo 'make test             cargo test [TEST_ARGS=...], the Python cloud'"'"'s tests, a list of skips'
	@echo 'make run              daemon in the foreground on a demo data dir (target/demo)'
	@echo 'make static [TARGET=x86_64|aarch64|armv7|mipsel|s390x] [FEATURES="agent mqtt ota"] [FAKECLOUD=1]'
	@echo '                      fully static musl binary in target/static/$$TARGET/miio_client'
	@echo 'make install DESTDIR=/path/to/rootfs PREFIX=/usr [STATIC=path/to/miio_client]'
	@echo 'make static-test [TARGET=...]  unit tests built like make static, other CPUs under qemu'
	@echo 'make fuzz [FUZZ_SECS=60] [FUZZ_TARGETS="rpc node"]  each cargo-fuzz target for N s (fuzz/README.md)'
	@echo 'make fuzz-cmin        minimize fuzz/corpus with what the campaigns found'
	@echo 'make fmt-check | clippy | check-features | clean'

all:
	$(CARGO) build --release

# cargo test, then the Python cloud's own tests (tests/pycloud/test_ocloud.py) with the python the Rust
# tests use for their peers, then one line listing every skipped test. A test that skips for a missing
# outside tool records itself in $(SKIP_FILE) (tests/common skip(), fresh per run); no python3 with
# cryptography skips the Python tests the same way. MIIO_REQUIRE_ALL=1 in the environment turns every
# skip into a failure (.ci/run sets it). The exit status is cargo's, or 1 when the Python tests failed.
TEST_PYTHON ?= $(or $(MIIO_PYTHON),$(wildcard tests/.venv/bin/python3),python3)
SKIP_FILE   := $(CURDIR)/target/test-skips.txt
test:
	@mkdir -p target && : >'$(SKIP_FILE)'
	@rc=0; \
	MIIO_SKIP_FILE='$(SKIP_FILE)' $(CARGO) test $(TEST_ARGS) || rc=$$?; \
	echo; echo 'Running tests/pycloud/test_ocloud.py ($(TEST_PYTHON) -m unittest)'; \
	if '$(TEST_PYTHON)' -c 'import cryptography' 2>/dev/null; then \
		if '$(TEST_PYTHON)' -m unittest discover -s tests/pycloud; then \
			echo 'test result: ok. tests/pycloud/test_ocloud.py'; \
		else \
			echo 'test result: FAILED. tests/pycloud/test_ocloud.py'; rc=1; \
		fi; \
	elif [ "$$MIIO_REQUIRE_ALL" = 1 ]; then \
		echo 'test result: FAILED. tests/pycloud/test_ocloud.py: python3 with cryptography is required (MIIO_REQUIRE_ALL=1) but missing'; \
		rc=1; \
	else \
		printf '%s\t%s\n' pycloud::test_ocloud 'python3 with cryptography' >>'$(SKIP_FILE)'; \
		echo 'test result: skipped. tests/pycloud/test_ocloud.py (no python3 with cryptography)'; \
	fi; \
	awk -F '\t' '!seen[$$0]++ { n++; s = s (n > 1 ? ", " : "") $$1 " (" $$2 ")" } \
		END { if (n) print "skipped: " n " test" (n > 1 ? "s" : "") " — " s; else print "skipped: none" }' \
		'$(SKIP_FILE)'; \
	exit $$rc

fmt-check:
	$(CARGO) fmt --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

# Every optional part alone and none of them: each subset a board may build must compile cleanly,
# and the unit tests pass without any of them.
FEATURE_SETS ?= none agent mqtt ota fakecloud
check-features:
	@set -e; for f in $(FEATURE_SETS); do \
		if [ "$$f" = none ]; then flags=; else flags="--features $$f"; fi; \
		echo "clippy --no-default-features $$flags"; \
		$(CARGO) clippy -q --all-targets --no-default-features $$flags -- -D warnings; \
	done
	@echo "unit tests with no optional part (what a build without them refuses, e.g. --mqtt)"
	$(CARGO) test -q --lib --no-default-features

clean:
	$(CARGO) clean
	rm -rf target

# --- run ------------------------------------------------------------------------------------------
# The main job: the daemon against the built-in fake cloud, both on loopback. The demo data dir is
# created only when absent (edits survive; `make clean` removes it). Ctrl-C stops both.
DEMO       := target/demo
DEMO_DID   := 123456789
DEMO_KEY   := DemoKey0123abcXY
# fw_ver of the demo: <VENDOR>_VERSION=x.y.z_nnnn in the demo's os-release (vendor=demo).
DEMO_FW    := 1.0.0_0001
RUN_CLOUD  ?= 18053
RUN_CTL    ?= 18054
RUN_LAN    ?= 18321
RUN_LOCAL  ?= 18322
RUN_BLE    ?= 18323
RUN_MDNS   ?= 18353
RUN_LEVEL  ?= 2
run: all
	@mkdir -p $(DEMO)
	@[ -e $(DEMO)/device.conf ] || printf '%s\n' '# demo identity for `make run`, not a real device' \
		'did=$(DEMO_DID)' 'key=$(DEMO_KEY)' 'mac=02:00:00:12:34:56' 'vendor=demo' 'model=demo.plug.v1' \
		>$(DEMO)/device.conf
	@[ -e $(DEMO)/device.token ] || (umask 077 && printf '%s' 'DemoToken0123456' >$(DEMO)/device.token)
	@[ -e $(DEMO)/wifi.conf ] || (umask 077 && printf '%s\n' 'ssid="demo-ssid"' 'psk="demo-passwd"' \
		'key_mgmt=WPA' 'uid=1' >$(DEMO)/wifi.conf)
	@[ -e $(DEMO)/os-release ] || printf '%s\n' 'NAME="demo firmware"' 'DEMO_VERSION=$(DEMO_FW)' >$(DEMO)/os-release
	@echo "fake cloud on 127.0.0.1:$(RUN_CLOUD) (control $(RUN_CTL)); daemon: LAN $(RUN_LAN), local API $(RUN_LOCAL)"
	@echo "push a command:  target/release/miio_client miio_fakecloud send --ctl-port $(RUN_CTL) '{\"method\":\"get_prop\",\"params\":[\"power\"]}'"
	@set -e; bin=target/release/miio_client; \
	$$bin miio_fakecloud --port $(RUN_CLOUD) --ctl-port $(RUN_CTL) --did $(DEMO_DID) --key $(DEMO_KEY) -l $(RUN_LEVEL) & \
	cloud=$$!; trap 'kill $$cloud 2>/dev/null' EXIT INT TERM; \
	$$bin -d $(DEMO)/ -H 127.0.0.1 -p $(RUN_CLOUD) --lan-port $(RUN_LAN) --local-port $(RUN_LOCAL) \
		--ble-port $(RUN_BLE) --mdns-port $(RUN_MDNS) --os-release $(DEMO)/os-release -l $(RUN_LEVEL) || test $$? -eq 130

# --- static ---------------------------------------------------------------------------------------
# A fully static musl ELF for a board, built with Debian's Rust (rustc-web, cargo-web, rust-web-src),
# never the rustup toolchain: std is rebuilt for the musl target from rust-web-src (-Z build-std), so no
# rustup musl target is needed. Everything generated lives under target/static: the cargo target dir
# (target/static/cargo, apart from the host build), and per board in target/static/$(TARGET)/sys the
# linker wrapper, the __fprintf_chk and pthread_setname_np shims and a libunwind.a that carries them.
STATIC_CARGO ?= /usr/bin/cargo
STATIC_RUSTC ?= /usr/bin/rustc
STATIC_RUSTDOC ?= /usr/bin/rustdoc
STATIC_DIR   := target/static
APT_INSTALL  := .ci/apt-install

triple_x86_64  := x86_64-unknown-linux-musl
# aarch64: atomics inline (see size_aarch64 below) through a target of our own too: rustc's
# aarch64-unknown-linux-musl with "-outline-atomics" in place of "+outline-atomics" in its features
# (as a -C target-feature, that one also warns that it is unstable).
triple_aarch64 := aarch64-inlineatomics-linux-musl
base_aarch64   := aarch64-unknown-linux-musl
spec_sed_aarch64 := s/+outline-atomics/-outline-atomics/
spec_has_aarch64 := "features": "+v8a,-outline-atomics"
# armv7: Thumb-2 code (see size_armv7 below) through a target of our own, made at build time from
# rustc's armv7-unknown-linux-musleabihf with "+thumb-mode" added to its features, as rustc's own
# thumbv7neon targets do. -C target-feature=+thumb-mode does the same but warns that the feature is
# unstable; the thumbv7neon target would need NEON, which some Cortex-A9 parts lack.
triple_armv7   := thumbv7-unknown-linux-musleabihf
base_armv7     := armv7-unknown-linux-musleabihf
spec_sed_armv7 := s/"features": "/"features": "+thumb-mode,/
spec_has_armv7 := "features": "+thumb-mode,
# mipsel: MIPS32r2 little-endian, hard-float. rustc's mipsel-unknown-linux-musl is soft-float, but
# Debian's musl-dev:mipsel (and the cross gcc's libgcc) are built hard-float (o32, FPXX), and the linker
# refuses to mix the two. So a target of our own: rustc's with "+soft-float" replaced by what Debian's
# gcc does by default (-mfpxx, which implies no odd single-precision registers). A board without an FPU
# runs it on the kernel's FPU emulator, which every MIPS Linux kernel has (CONFIG_MIPS_FP_SUPPORT); the
# daemon does almost no floating point, so the emulator's cost does not show.
triple_mipsel  := mipsel-hardfloat-linux-musl
base_mipsel    := mipsel-unknown-linux-musl
spec_sed_mipsel := s/"features": "+mips32r2,+soft-float"/"features": "+mips32r2,+fpxx,+nooddspreg"/
spec_has_mipsel := "features": "+mips32r2,+fpxx,+nooddspreg"
# s390x: the big-endian build. No board is an IBM Z; it exists so that `make static-test` and the
# end-to-end run (.ci/run) execute on a big-endian CPU under qemu and catch a field or an address built
# in the host's byte order. Debian has no big-endian MIPS port (and so no musl for one); s390x it has.
triple_s390x   := s390x-unknown-linux-musl
# The linker: the board's gcc with Debian's musl specs (x86_64: exactly what Debian's musl-gcc runs).
cc_x86_64      := musl-gcc
cc_aarch64     := aarch64-linux-gnu-gcc -specs /usr/lib/aarch64-linux-musl/musl-gcc.specs
cc_armv7       := arm-linux-gnueabihf-gcc -specs /usr/lib/arm-linux-musleabihf/musl-gcc.specs
ar_x86_64      := ar
ar_aarch64     := aarch64-linux-gnu-ar
cc_mipsel       = mipsel-linux-gnu-gcc -specs $(if $(S_MUSL),$(S_SYS)/musl-gcc.specs,/usr/lib/mipsel-linux-musl/musl-gcc.specs)
cc_s390x       := s390x-linux-gnu-gcc -specs /usr/lib/s390x-linux-musl/musl-gcc.specs
ar_armv7       := arm-linux-gnueabihf-ar
ar_mipsel      := mipsel-linux-gnu-ar
ar_s390x       := s390x-linux-gnu-ar
# Debian architecture of libunwind-14-dev. The host's comes from the installed package; a foreign one is
# unpacked from its .deb into target/static/$(TARGET)/deb, since a multiarch install of it conflicts.
debarch_aarch64 := arm64
debarch_armv7   := armhf
# Debian builds LLVM's libunwind for neither mipsel nor s390x: there the unwinder is the cross gcc's
# libgcc_eh.a (GCC's own _Unwind_*, which only the unit tests' PANIC=unwind build calls).
unwind_mipsel   := gcc
unwind_s390x    := gcc
pkgs_common    := rustc-web cargo-web rust-web-src
pkgs_x86_64    := musl-tools libunwind-14-dev
pkgs_aarch64   := gcc-aarch64-linux-gnu musl-dev:arm64
pkgs_armv7     := gcc-arm-linux-gnueabihf musl-dev:armhf
pkgs_mipsel    := gcc-mipsel-linux-gnu musl-dev:mipsel dpkg-dev
pkgs_s390x     := gcc-s390x-linux-gnu musl-dev:s390x
STATIC_TARGETS ?= $(TARGET)
static_pkgs = $(pkgs_common) $(foreach t,$(STATIC_TARGETS),$(pkgs_$(t)))

S_TRIPLE = $(or $(triple_$(TARGET)),$(error TARGET must be x86_64, aarch64, armv7, mipsel or s390x, not '$(TARGET)'))
# What --target gets: the triple, or the path of the spec file of a target of our own.
S_TARGET = $(if $(base_$(TARGET)),$(S_SYS)/$(S_TRIPLE).json -Z json-target-spec,$(S_TRIPLE))
S_SPEC   = $(S_SYS)/$(S_TRIPLE).json
S_OUT    = $(STATIC_DIR)/$(TARGET)
S_SYS    = $(abspath $(S_OUT)/sys)
S_UNWIND = $(if $(unwind_$(TARGET)),$$($(S_SYS)/cc -print-file-name=libgcc_eh.a),$(if $(debarch_$(TARGET)),$(S_OUT)/deb/usr/lib/llvm-14/lib/libunwind.a,/usr/lib/llvm-14/lib/libunwind.a))
# Only what FEATURES names (and the fake cloud with FAKECLOUD=1): the host build's defaults do not apply.
S_FEATURE_LIST = $(strip $(FEATURES) $(if $(filter 1,$(FAKECLOUD)),fakecloud))
S_FEATURES = --no-default-features $(if $(S_FEATURE_LIST),--features '$(S_FEATURE_LIST)')
# Without relocation-model=static, Debian's musl-gcc links a binary that asks for the musl loader.
# link-self-contained=no: crt objects and libc come from Debian's musl through the specs file.
PANIC ?= immediate-abort
# With immediate-abort nothing unwinds, so the unwind tables (.eh_frame, ~60 KB) go too.
S_PANIC = $(if $(filter immediate-abort,$(PANIC)),-Zunstable-options -Cpanic=immediate-abort -Cforce-unwind-tables=no)
# Flash (each figure: the stripped binary before/after, README "Static builds"):
# - location-detail=none: no file/line/column strings for panic locations, which immediate-abort never
#   prints and nothing else reads (-4.9 KB aarch64).
# - -z norelro: musl applies no RELRO in a static binary (only its dynamic loader does), so the
#   segment is inert; what it cost is padding up to a max-page-size boundary, up to 64 KB on ARM
#   (-22 KB aarch64).
S_SIZE = -Zlocation-detail=none -C link-arg=-Wl,-z,norelro
# armv7: Thumb-2 code instead of 32-bit ARM instructions, as Debian's own armhf musl already is
# (-82 KB; the target spec triple_armv7 carries it). aarch64: atomics inline (LL/SC) instead of
# through the runtime-dispatched outline helpers (-2.2 KB; the target spec triple_aarch64 carries
# it), and more rounds of the machine outliner that opt-level=z runs there anyway (-1.3 KB).
size_aarch64 := -C llvm-args=-machine-outliner-reruns=4
# mipsel: LLVM fills a branch's delay slot only from the instructions before it unless told to look
# after it and in the successor block too (-7,152 B; 1,300 fewer nops). Tail calls, which LLVM's MIPS
# back end leaves off unless asked: a call in tail position becomes a jump, without saving and
# reloading $ra around it; in a static non-PIC binary there is no $gp to restore after a call, the
# one thing that makes them unsafe in PIC code. No trap after each division by zero (`teq`): Rust
# checks the divisor itself before every division that can see zero and panics, so the trap is dead
# code (46 instructions). Together -2,420 B of .text, tail calls nearly all of it. make static-test
# builds without optimisation, where no tail call is made; the unit tests built as the binary is
# (opt-level z, LTO) pass under qemu too: CARGO_PROFILE_RELEASE_PANIC=unwind make static-test
# TARGET=mipsel TEST_ARGS=--release (a STATIC_DIR of its own: std is built differently there).
size_mipsel := -C llvm-args=-disable-mips-df-forward-search=false -C llvm-args=-disable-mips-df-succbb-search=false \
	-C llvm-args=-mips-tail-calls -C llvm-args=-mno-check-zero-division
# rustc's mips and s390x musl targets link dynamically unless told otherwise (they were made for
# OpenWrt-style systems); the other boards' targets are static by default.
static_mipsel := -C target-feature=+crt-static
static_s390x  := -C target-feature=+crt-static
# 64-bit time_t on the 32-bit boards: Debian's musl is 1.2.3, whose time_t is 64 bits on every CPU and
# whose time functions for 32-bit CPUs are the __*_time64 symbols. The libc crate binds the old 32-bit
# ones unless told the musl is 1.2 (it then also stops flagging time_t deprecated): the --cfg tells our
# libc, the environment variable the older libc vendored with std. Without it the log's time stamps
# would go wrong in 2038 (sys::tests::localtime_after_2038 checks under make static-test).
S_TIME64 = --cfg libc_unstable_musl_v1_2
S_RUSTFLAGS = -C linker=$(S_SYS)/cc -C link-self-contained=no -C relocation-model=static -L native=$(S_SYS) $(S_PANIC) \
	$(S_SIZE) $(size_$(TARGET)) $(static_$(TARGET)) $(S_TIME64)
S_ENV = env -u CARGO_ENCODED_RUSTFLAGS -u RUSTC_WRAPPER -u RUSTC_WORKSPACE_WRAPPER RUSTC_BOOTSTRAP=1 \
	RUST_LIBC_UNSTABLE_MUSL_V1_2_3=1 \
	RUSTC=$(STATIC_RUSTC) RUSTDOC=$(STATIC_RUSTDOC) CARGO_TARGET_DIR=$(STATIC_DIR)/cargo RUSTFLAGS='$(S_RUSTFLAGS)'
BUILD_STD := -Z build-std=std,panic_abort
# std built for size. PANIC=immediate-abort (the default) also drops the panic message machinery:
# a panic still aborts, it just prints nothing. PANIC=abort keeps the messages.
STD_FEATURES ?= optimize_for_size

# libunwind.a of Debian is built against glibc with _FORTIFY_SOURCE and calls __fprintf_chk, which musl
# lacks. The shim maps it to vfprintf. It goes into our copy of libunwind.a, so the linker finds it
# wherever libunwind needs it (only builds that unwind do) and nowhere else.
define FPRINTF_CHK_C
#include <stdarg.h>
#include <stdio.h>
int __fprintf_chk(FILE *f, int flag, const char *fmt, ...)
{
	va_list ap;
	int r;
	(void)flag;
	va_start(ap, fmt);
	r = vfprintf(f, fmt, ap);
	va_end(ap);
	return r;
}
endef
export FPRINTF_CHK_C

# std names a thread it spawns (the resolver's) by calling pthread_setname_np from inside that thread.
# musl's version formats a /proc path with snprintf even though the calling thread needs only prctl,
# and that one call links the whole printf family (vfprintf, float formatting, 128-bit float soft-math):
# ~12 KB on aarch64. This replacement does the same for the calling thread; naming another thread,
# which nothing in the binary does, reports ENOTSUP. It rides in the same libunwind.a, which the link
# reads before libc.a, so libc's member is never pulled in.
define SETNAME_C
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/prctl.h>
int pthread_setname_np(pthread_t thread, const char *name)
{
	if (strnlen(name, 16) > 15)
		return ERANGE;
	if (!pthread_equal(thread, pthread_self()))
		return ENOTSUP;
	return prctl(PR_SET_NAME, (unsigned long)name, 0UL, 0UL, 0UL) ? errno : 0;
}
endef
export SETNAME_C

# libgcc_eh.a of the cross gcc (the unwinder on mipsel and s390x) is built for glibc 2.36: it finds a
# PC's unwind tables with _dl_find_object, which musl lacks, and has no fallback when that fails. This
# one answers for the static binary itself from its program headers (dl_iterate_phdr, which musl has):
# the PT_LOAD span holding the PC and the PT_GNU_EH_FRAME segment. The struct is glibc's layout on
# CPUs without DLFO_STRUCT_HAS_EH_DBASE/EH_COUNT (all but i386, nios2 and arm). It goes only into
# those boards' libunwind.a and is linked only by builds that unwind (the unit tests).
define DL_FIND_OBJECT_C
#define _GNU_SOURCE
#include <link.h>
#include <stdint.h>
struct dl_find_object {
	unsigned long long dlfo_flags;
	void *dlfo_map_start, *dlfo_map_end, *dlfo_link_map, *dlfo_eh_frame;
	unsigned long long dlfo_reserved[7];
};
struct query { uintptr_t pc; struct dl_find_object *out; int found; };
static int visit(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct query *q = arg;
	uintptr_t lo = UINTPTR_MAX, hi = 0;
	void *eh = 0;
	int holds = 0;
	(void)size;
	for (size_t i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t a = info->dlpi_addr + ph->p_vaddr;
		if (ph->p_type == PT_LOAD) {
			if (a < lo) lo = a;
			if (a + ph->p_memsz > hi) hi = a + ph->p_memsz;
			if (q->pc >= a && q->pc - a < ph->p_memsz) holds = 1;
		} else if (ph->p_type == PT_GNU_EH_FRAME) {
			eh = (void *)a;
		}
	}
	if (!holds)
		return 0;
	q->out->dlfo_flags = 0;
	q->out->dlfo_map_start = (void *)lo;
	q->out->dlfo_map_end = (void *)hi;
	q->out->dlfo_link_map = 0;
	q->out->dlfo_eh_frame = eh;
	q->found = eh != 0;
	return 1;
}
int _dl_find_object(void *pc, struct dl_find_object *out)
{
	struct query q = { (uintptr_t)pc, out, 0 };
	dl_iterate_phdr(visit, &q);
	return q.found ? 0 : -1;
}
endef
export DL_FIND_OBJECT_C

# musl rebuilt for size (mipsel): Debian's libc.a for mipsel is built -O2 and, since Debian's gcc makes
# position-independent executables by default, as PIC code: every function sets up $gp, calls through
# the GOT (lw $t9; jalr $t9) and reloads $gp after each call. The same source package version as the
# installed musl-dev (the headers stay Debian's), built with musl's own size settings (-Os, no unwind
# tables) as non-PIC code that calls with jal (-fno-pie -mno-shared -mplt; still abicalls, so it links
# with gcc's libgcc and crt objects unchanged). Kept from Debian's hardening: -fstack-protector-strong
# (2.6 KB here; musl parses DNS answers). musl's .text in the binary: 77.8 KB -> 61.9 KB (-Os about
# -7.5 KB, non-PIC calls -8.9 KB); with the tail calls below the file 407,824 -> 387,804 B. The source
# comes through apt (the Debian mirror's signed Sources index, fetched into the build dir with a
# deb-src line of its own, so the system's apt sources are not touched; MUSL_DEB_SRC is that line);
# the build takes about 50 s of CPU once per STATIC_DIR (stamp: version and flags) and keeps only
# lib/. MUSL_REBUILD=0 links Debian's libc.a as it is.
MUSL_REBUILD ?= 1
musl_mipsel := mipsel
MUSL_CFLAGS := -fno-pie -mno-shared -mplt -fstack-protector-strong
MUSL_JOBS   ?= 2
MUSL_DEB_SRC ?= deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $(shell . /etc/os-release 2>/dev/null && echo $$VERSION_CODENAME) main
S_MUSL = $(if $(filter 1,$(MUSL_REBUILD)),$(if $(musl_$(TARGET)),$(abspath $(S_OUT)/musl)))
S_MUSL_LIB = /usr/lib/$(TARGET)-linux-musl

static-musl: static-deps
	@[ -z '$(S_MUSL)' ] || { \
	set -e; v=$$(dpkg-query -W -f='$${Version}' musl-dev:$(musl_$(TARGET))); \
	stamp="musl $$v CFLAGS=$(MUSL_CFLAGS)"; \
	[ "$$(cat '$(S_MUSL)/stamp' 2>/dev/null)" = "$$stamp" ] && exit 0; \
	echo "rebuilding Debian's musl $$v for $(TARGET) into $(S_MUSL) (CFLAGS=$(MUSL_CFLAGS))"; \
	rm -rf '$(S_MUSL)'; mkdir -p '$(S_MUSL)/apt/lists/partial' '$(S_MUSL)/apt/cache/archives/partial'; \
	cd '$(S_MUSL)'; echo '$(MUSL_DEB_SRC)' >apt/sources.list; \
	o="-o Dir::Etc::SourceList=$$PWD/apt/sources.list -o Dir::Etc::SourceParts=/dev/null \
	   -o Dir::State::Lists=$$PWD/apt/lists -o Dir::Cache=$$PWD/apt/cache -o APT::Sandbox::User=root"; \
	apt-get -q $$o update >apt/update.log || { cat apt/update.log; echo "cannot fetch the Sources index of '$(MUSL_DEB_SRC)' (MUSL_DEB_SRC)" >&2; exit 1; }; \
	apt-get -q $$o source --download-only "musl=$$v"; \
	dpkg-source -x musl_*.dsc src >apt/source.log 2>&1 || { cat apt/source.log; exit 1; }; \
	mkdir -p src/src/fts; cp src/debian/musl-fts/fts.c src/debian/musl-fts/config.h src/src/fts/; \
	cp src/debian/musl-fts/fts.h src/include/; \
	mkdir build; cd build; \
	../src/configure --target=$(TARGET)-linux-gnu CROSS_COMPILE=$(TARGET)-linux-gnu- CC=$(TARGET)-linux-gnu-gcc \
		CFLAGS='$(MUSL_CFLAGS)' --enable-optimize=size --disable-shared >../configure.log; \
	env -u MAKEFLAGS -u MAKELEVEL -u MFLAGS make -s -j$(MUSL_JOBS) 'AOBJS=$$(LIBC_OBJS)' \
		lib/libc.a lib/Scrt1.o lib/crt1.o lib/crti.o lib/crtn.o $$(printf 'lib/lib%s.a ' m rt pthread crypt util xnet resolv dl) \
		>../build.log 2>&1 || { tail -30 ../build.log; exit 1; }; \
	cd ..; mv build/lib lib; rm -rf apt build build.log src musl_*; echo "$$stamp" >stamp; }

# Print the Debian packages that `make static` needs for STATIC_TARGETS (default: TARGET).
static-packages:
	@echo $(static_pkgs)

static-deps:
	@$(APT_INSTALL) $(static_pkgs)

static-glue: static-deps static-musl
	@: $(S_TRIPLE)
	@mkdir -p $(S_SYS)
	@if [ -n '$(S_MUSL)' ]; then \
		sed 's#$(S_MUSL_LIB)#$(S_MUSL)/lib#g' $(S_MUSL_LIB)/musl-gcc.specs >$(S_SYS)/musl-gcc.specs.tmp && \
		mv $(S_SYS)/musl-gcc.specs.tmp $(S_SYS)/musl-gcc.specs; fi
	@printf '#!/bin/sh\n# generated by make static: link for %s against %s\nexec %s "$$@"\n' \
		'$(S_TRIPLE)' '$(if $(S_MUSL),musl rebuilt from Debian'"'"'s source,Debian musl)' '$(cc_$(TARGET))' >$(S_SYS)/cc.tmp
	@chmod 0755 $(S_SYS)/cc.tmp && mv $(S_SYS)/cc.tmp $(S_SYS)/cc
	@if [ -n '$(base_$(TARGET))' ]; then \
		RUSTC_BOOTSTRAP=1 $(STATIC_RUSTC) -Z unstable-options --print target-spec-json --target $(base_$(TARGET)) \
		| sed '$(spec_sed_$(TARGET))' >$(S_SPEC).tmp && \
		grep -qF '$(spec_has_$(TARGET))' $(S_SPEC).tmp && mv $(S_SPEC).tmp $(S_SPEC) || \
		{ echo "cannot make the target spec $(S_SPEC)" >&2; exit 1; }; \
	fi
	@if [ -n '$(debarch_$(TARGET))' ] && [ ! -f $(S_UNWIND) ]; then \
		echo "unpacking libunwind-14-dev:$(debarch_$(TARGET)) into $(S_OUT)/deb"; \
		rm -rf $(S_OUT)/deb && mkdir -p $(S_OUT)/deb && cd $(S_OUT)/deb && \
		apt-get download -q -o APT::Sandbox::User=root libunwind-14-dev:$(debarch_$(TARGET)) && \
		dpkg-deb -x libunwind-14-dev_*.deb . ; \
	fi
	@test -f "$(S_UNWIND)" || { echo "no libunwind.a at $(S_UNWIND)" >&2; exit 1; }
	@printf '%s\n' "$$FPRINTF_CHK_C" >$(S_SYS)/fprintf_chk.c
	$(S_SYS)/cc -Os -c $(S_SYS)/fprintf_chk.c -o $(S_SYS)/fprintf_chk.o
	@printf '%s\n' "$$SETNAME_C" >$(S_SYS)/setname.c
	$(S_SYS)/cc -Os -ffunction-sections -c $(S_SYS)/setname.c -o $(S_SYS)/setname.o
	@if [ -n '$(unwind_$(TARGET))' ]; then printf '%s\n' "$$DL_FIND_OBJECT_C" >$(S_SYS)/dl_find_object.c; fi
	$(if $(unwind_$(TARGET)),$(S_SYS)/cc -Os -c $(S_SYS)/dl_find_object.c -o $(S_SYS)/dl_find_object.o)
	@rm -f $(S_SYS)/libunwind.a && cp "$(S_UNWIND)" $(S_SYS)/libunwind.a && chmod u+w $(S_SYS)/libunwind.a
	$(ar_$(TARGET)) rs $(S_SYS)/libunwind.a $(S_SYS)/fprintf_chk.o $(S_SYS)/setname.o \
		$(if $(unwind_$(TARGET)),$(S_SYS)/dl_find_object.o)

static: static-glue
	@echo "$(TARGET): $$($(STATIC_RUSTC) --version), $$($(STATIC_CARGO) --version)"
	$(S_ENV) $(STATIC_CARGO) fetch --locked --target $(S_TARGET) $(BUILD_STD)
	$(S_ENV) $(STATIC_CARGO) build --release --locked $(S_FEATURES) --target $(S_TARGET) \
		$(BUILD_STD) -Z build-std-features=$(STD_FEATURES)
	cp $(STATIC_DIR)/cargo/$(S_TRIPLE)/release/miio_client $(S_OUT)/miio_client
	@! command -v file >/dev/null || file $(S_OUT)/miio_client
	@echo "$(S_OUT)/miio_client: $$(stat -c %s $(S_OUT)/miio_client) bytes (features: $(or $(S_FEATURE_LIST),none))"

# The crate's unit tests (--lib --bins) built the same way, for the board's libc and word size, run
# natively (x86_64) or under qemu-user-static (the others). Not part of `make test`: each board costs a debug
# build of std. The loopback tests in tests/ are left to the host build.
runner_aarch64 := qemu-aarch64-static
runner_armv7   := qemu-arm-static
runner_mipsel  := qemu-mipsel-static
runner_s390x   := qemu-s390x-static
S_RUNNER_VAR = CARGO_TARGET_$(subst -,_,$(shell echo '$(S_TRIPLE)' | tr a-z A-Z))_RUNNER

# Tests unwind: no immediate-abort for them.
static-test: PANIC = unwind
# Nor the flash-only flags: a failing test should name its line.
static-test: S_SIZE =
static-test: static-glue
	@$(APT_INSTALL) $(if $(runner_$(TARGET)),qemu-user-static)
	$(S_ENV) $(if $(runner_$(TARGET)),$(S_RUNNER_VAR)=$(runner_$(TARGET))) $(STATIC_CARGO) test --locked --lib --bins \
		--target $(S_TARGET) -Z build-std $(TEST_ARGS)

# --- install --------------------------------------------------------------------------------------
# $(DESTDIR)$(PREFIX)/bin/miio_client plus one symlink per applet, the data dir /etc/miio with the
# example config and the shipped scripts, and the init scripts. An existing device.conf (the board's
# identity) is never touched: only device.conf.example is installed.
INSTALL_BIN = $(or $(STATIC),target/release/miio_client)

install: $(if $(STATIC),,all)
	@test -f '$(INSTALL_BIN)' || { echo "no binary at $(INSTALL_BIN)" >&2; exit 1; }
	install -d '$(DESTDIR)$(PREFIX)/bin' '$(DESTDIR)/etc/miio' '$(DESTDIR)/etc/init.d'
	install -m 0755 '$(INSTALL_BIN)' '$(DESTDIR)$(PREFIX)/bin/miio_client'
	@set -e; applets="$(or $(APPLETS),$$(.ci/list-applets '$(INSTALL_BIN)'))"; \
	for a in $$applets; do \
		case $$a in miio_client) continue ;; *[!a-z0-9_]*) echo "install: bad applet name '$$a'" >&2; exit 1 ;; esac; \
		echo "ln -sf miio_client $(DESTDIR)$(PREFIX)/bin/$$a"; \
		ln -sf miio_client '$(DESTDIR)$(PREFIX)/bin/'"$$a"; \
	done
	install -m 0644 etc/miio/device.conf.example '$(DESTDIR)/etc/miio/device.conf.example'
	@for f in etc/miio/*.sh; do \
		[ -f "$$f" ] || continue; \
		echo "install -m 0755 $$f $(DESTDIR)/etc/miio/"; \
		install -m 0755 "$$f" '$(DESTDIR)/etc/miio/' || exit 1; \
	done
	@for f in init.d/S[0-9][0-9]*; do \
		[ -f "$$f" ] || continue; \
		echo "install -m 0755 $$f $(DESTDIR)/etc/init.d/"; \
		install -m 0755 "$$f" '$(DESTDIR)/etc/init.d/' || exit 1; \
	done
	@[ -e '$(DESTDIR)/etc/miio/device.conf' ] || \
		echo "install: no $(DESTDIR)/etc/miio/device.conf yet; write one from device.conf.example"

# --- bench ----------------------------------------------------------------------------------------
# What the daemon costs (flash, memory, wakeups, round trip, throughput, CPU, start-up, LAN), each
# figure next to a reference measured in the same run: tests/bench/README.md. Loopback only; installs
# nothing (a missing tool skips its row); reports and never fails on a figure. Prints a table and
# writes target/bench/results.json. Knobs (environment): BENCH_IDLE_SECS=120 BENCH_TPUT_SECS=30
# BENCH_RTT_N=2000 BENCH_CPU_N=2000 BENCH_STARTS=10 BENCH_LAN_N=1000 BENCH_ROUNDS=10 BENCH_CPU=N|none
# BENCH_STATIC_TARGETS="x86_64 aarch64 armv7" BENCH_HOSTILE_SECS=60
# BENCH_ONLY=flash,session,startup,static-memory,cpu,syscalls,hostile
# BENCH_WITHOUT="mosquitto valgrind ..." (pretend a tool is missing).
BENCH_PYTHON ?= $(or $(MIIO_PYTHON),$(wildcard tests/.venv/bin/python3),python3)
.PHONY: bench
bench:
	CARGO='$(CARGO)' MAKE='$(MAKE)' $(BENCH_PYTHON) tests/bench/bench.py

# --- fuzz -----------------------------------------------------------------------------------------
# Coverage-guided fuzzing (fuzz/README.md): cargo-fuzz on the nightly toolchain, installed from
# crates.io when missing. Each target runs FUZZ_SECS seconds, one after the other, one job each; a
# line per target gives its executions, speed and crashes (inputs in fuzz/artifacts/<target>/); the
# exit status is 1 when one crashed. Campaigns read fuzz/corpus, fuzz/regressions and the seeds of
# fuzz/seeds.py, and keep what they find in fuzz/work/<target> (not committed; `make fuzz-cmin`
# folds it into fuzz/corpus).
FUZZ_SECS    ?= 60
# FUZZ_RUNS=N: stop a target after N executions (FUZZ_SECS still bounds the time).
FUZZ_RUNS    ?=
FUZZ_TARGETS ?= miio_packet miio_sealed json_stream rpc config dns cloud lan local node mqtt
FUZZ_FLAGS   ?= -timeout=10 -rss_limit_mb=2048
FUZZ_NIGHTLY ?= +nightly
# No AddressSanitizer by default: the crate has no unsafe code outside io/sys.rs, which no target
# reaches, and ASan's allocation bookkeeping costs 2-7x the speed. FUZZ_SANITIZER=address for it.
FUZZ_SANITIZER ?= none
FUZZ_HOST    := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
FUZZ_BIN      = $(CURDIR)/fuzz/target/$(FUZZ_HOST)/release
FUZZ_DIR     := $(CURDIR)/fuzz
.PHONY: fuzz fuzz-build fuzz-cmin

fuzz-build:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz
	$(CARGO) $(FUZZ_NIGHTLY) fuzz build -s $(FUZZ_SANITIZER)
	@mkdir -p fuzz/work && python3 fuzz/seeds.py fuzz/work/seeds >/dev/null

fuzz: fuzz-build
	@printf '%-12s %14s %10s %8s  %s\n' target executions exec/s crashes seconds
	@bad=0; for t in $(FUZZ_TARGETS); do \
		w=$(FUZZ_DIR)/work; a=$(FUZZ_DIR)/artifacts/$$t; \
		mkdir -p $$w/$$t $$w/$$t.run $$w/seeds/$$t $$a $(FUZZ_DIR)/corpus/$$t $(FUZZ_DIR)/regressions/$$t; \
		before=$$(ls $$a | grep -cE '^(crash|leak|oom|timeout)-'); \
		start=$$(date +%s); \
		( cd $$w/$$t.run && rm -f fuzz-*.log && $(FUZZ_BIN)/$$t $$w/$$t $(FUZZ_DIR)/corpus/$$t \
			$(FUZZ_DIR)/regressions/$$t $$w/seeds/$$t -max_total_time=$(FUZZ_SECS) -jobs=1 -workers=1 \
			-print_final_stats=1 -artifact_prefix=$$a/ $(if $(FUZZ_RUNS),-runs=$(FUZZ_RUNS)) $(FUZZ_FLAGS) \
			>console.log 2>&1 ); \
		log=$$w/$$t.run/fuzz-0.log; \
		runs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $$log | tail -1); \
		speed=$$(sed -n 's/^stat::average_exec_per_sec: *//p' $$log | tail -1); \
		crashes=$$(( $$(ls $$a | grep -cE '^(crash|leak|oom|timeout)-') - before )); \
		printf '%-12s %14s %10s %8s  %s\n' $$t "$${runs:-?}" "$${speed:-?}" $$crashes $$(( $$(date +%s) - start )); \
		if [ $$crashes -gt 0 ] || [ -z "$$runs" ]; then bad=1; grep -m1 -A3 -E 'panicked|ERROR: libFuzzer' $$log; fi; \
	done; exit $$bad

# Each target's corpus minimized (libFuzzer -merge=1, what `cargo fuzz cmin` runs) over the committed
# corpus, the seeds and what the campaigns found; the result replaces fuzz/corpus/<target>. It keeps
# every edge reached but not each hit-count variant (-use_counters=0): a tenth of the size for the
# same edges, and a campaign finds the variants again within seconds.
FUZZ_CMIN_FLAGS ?= -use_counters=0
fuzz-cmin: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
		w=$(FUZZ_DIR)/work; rm -rf $$w/$$t.min; mkdir -p $$w/$$t.min $$w/$$t $(FUZZ_DIR)/corpus/$$t; \
		$(FUZZ_BIN)/$$t -merge=1 $$w/$$t.min $(FUZZ_DIR)/corpus/$$t $$w/seeds/$$t $$w/$$t $(FUZZ_CMIN_FLAGS) \
			$(FUZZ_FLAGS) \
			>$$w/$$t.min.log 2>&1 || { tail -5 $$w/$$t.min.log; exit 1; }; \
		rm -rf $(FUZZ_DIR)/corpus/$$t && mv $$w/$$t.min $(FUZZ_DIR)/corpus/$$t; \
		echo "$$t: $$(ls $(FUZZ_DIR)/corpus/$$t | wc -l) files, $$(cat $(FUZZ_DIR)/corpus/$$t/* | wc -c) bytes"; \
	done
