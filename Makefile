# kata-rs: `make demo` and `make test` work on a fresh Debian 12 machine (as root).
SUITE ?= bookworm
GUEST_DIR := build/guest/$(SUITE)
AGENT := target/release/criu-bridge
SHIM := target/release/containerd-shim-kata-rs-v2
CARGO ?= cargo
export KATA_RS_GUEST_DIR := $(abspath $(GUEST_DIR))

PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: all setup build guest-image check install uninstall test unit-test integration-test bench lockup-ab demo clean

all: build

setup:
	bash scripts/setup.sh

build:
	$(CARGO) build --release --workspace

guest-image: setup
	$(CARGO) build --release -p criu-bridge
	bash configs/guest/build.sh --suite $(SUITE) --agent $(AGENT) --out $(GUEST_DIR)

# Host and guest readiness (boots a VM, runs `criu check` in it).
check: guest-image build
	bash scripts/with-config.sh $(SHIM) check

# The shim on PATH (containerd finds io.containerd.kata-rs.v2 as containerd-shim-kata-rs-v2), the guest
# image in /usr/share/kata-rs, the configuration in /etc/kata-rs (an existing one is kept: it is the
# admin's; the shipped one is also in /usr/share/kata-rs for reference).
install: guest-image build
	install -D -m 0755 $(SHIM) $(DESTDIR)$(PREFIX)/bin/containerd-shim-kata-rs-v2
	install -D -m 0644 $(GUEST_DIR)/vmlinux $(DESTDIR)/usr/share/kata-rs/vmlinux
	install -D -m 0644 $(GUEST_DIR)/initramfs.cpio $(DESTDIR)/usr/share/kata-rs/initramfs.cpio
	install -D -m 0644 configs/configuration.toml $(DESTDIR)/usr/share/kata-rs/configuration.toml
	@if [ -e $(DESTDIR)/etc/kata-rs/configuration.toml ]; then \
	  echo "kept $(DESTDIR)/etc/kata-rs/configuration.toml (the shipped one is $(DESTDIR)/usr/share/kata-rs/configuration.toml)"; \
	else install -D -m 0644 configs/configuration.toml $(DESTDIR)/etc/kata-rs/configuration.toml; fi

# Removes what `install` put there; /etc/kata-rs/configuration.toml only if it is still the shipped one.
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/containerd-shim-kata-rs-v2
	@if [ -e $(DESTDIR)/etc/kata-rs/configuration.toml ] && ! cmp -s $(DESTDIR)/etc/kata-rs/configuration.toml $(DESTDIR)/usr/share/kata-rs/configuration.toml; then \
	  echo "kept $(DESTDIR)/etc/kata-rs/configuration.toml: it was changed after install"; \
	else rm -f $(DESTDIR)/etc/kata-rs/configuration.toml; rmdir $(DESTDIR)/etc/kata-rs 2>/dev/null || true; fi
	rm -f $(DESTDIR)/usr/share/kata-rs/vmlinux $(DESTDIR)/usr/share/kata-rs/initramfs.cpio $(DESTDIR)/usr/share/kata-rs/configuration.toml
	rmdir $(DESTDIR)/usr/share/kata-rs 2>/dev/null || true

unit-test:
	$(CARGO) test --workspace --lib --bins

integration-test: guest-image build
	$(CARGO) test --release -p kata-rs-tests --tests -- --test-threads=1

# Unit tests; VM tests; against containerd 1.6 (Debian 12's, installed): the containerd, checkpoint,
# workloads (volumes, hooks), network (CNI; each test in namespaces of its own), hostile-guest, fault,
# bad-input and load suites, and `make install` (installs into this machine, runs and checkpoints
# through the installed files, uninstalls); against containerd 2.1 (Debian sid's, unpacked, not
# installed): the containerd suite, the checkpoint tests that go through ctr's and containerd's own
# checkpoint code, and the pods (CRI) suite; against containerd 1.7 (Debian 13's, unpacked): the
# containerd suite.
# Each suite runs once: a failure fails `make test`. What containerd's version does not change runs
# against 1.6 only: volumes, hooks and ctr's CNI (workloads, network: the shim sees the same spec and
# namespace from every version; 2.1's path to them is the pods suite), and the checkpoint tests that call
# the shim directly or test the shim's and CRIU's own limits and errors.
SID_CHECKPOINT_SKIP := --skip checkpoint_options_sent_to_the_shim_exit_and_bad_input \
  --skip memory_of_256_mib_survives_a_deadline_a_checkpoint_and_a_restore \
  --skip restore_from_a_corrupted_image_fails_with_criu_errors_and_leaves_no_vm
test: setup guest-image build
	$(CARGO) test --release --workspace --exclude kata-rs-tests --lib --bins
	$(CARGO) test --release -p kata-rs-tests --tests --no-run
	$(CARGO) test --release -p kata-rs-tests --test vm -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test containerd -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test checkpoint -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test workloads -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test network -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test hostile -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test faults -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test badinput -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test load -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test install -- --test-threads=1
	KATA_RS_CONTAINERD_BIN_DIR=$$(bash scripts/containerd-debian.sh sid) \
	  $(CARGO) test --release -p kata-rs-tests --test containerd --test checkpoint --test pods -- --test-threads=1 \
	  $(SID_CHECKPOINT_SKIP)
	KATA_RS_CONTAINERD_BIN_DIR=$$(bash scripts/containerd-debian.sh trixie) \
	  $(CARGO) test --release -p kata-rs-tests --test containerd -- --test-threads=1

bench: setup guest-image build
	KATA_RS_HOST_CRIU=$$(bash scripts/host-criu.sh) KATA_RS_BENCH_CRI_CONTAINERD=$$(bash scripts/containerd-debian.sh sid) $(CARGO) run --release -q -p kata-rs-tests --bin bench

# The experiment behind the 1-vCPU default under TCG: soft lockups per vCPU count and TCG threading
# (docs/architecture.md, known limits). About 15 minutes here.
lockup-ab: guest-image build
	$(CARGO) run --release -q -p kata-rs-tests --bin lockup_ab

demo: guest-image build
	$(CARGO) run --release -q -p kata-rs-tests --bin demo

clean:
	rm -rf build target
