# kata-rs: `make demo` and `make test` work on a fresh Debian 12 machine (as root).
SUITE ?= bookworm
GUEST_DIR := build/guest/$(SUITE)
AGENT := target/release/criu-bridge
SHIM := target/release/containerd-shim-kata-rs-v2
CARGO ?= cargo
export KATA_RS_GUEST_DIR := $(abspath $(GUEST_DIR))

.PHONY: all setup build guest-image check test unit-test integration-test bench demo clean

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

unit-test:
	$(CARGO) test --workspace --lib --bins

integration-test: guest-image build
	$(CARGO) test --release -p kata-rs-tests --tests -- --test-threads=1

# Unit tests, then VM, containerd 1.6, checkpoint, hostile-guest, fault, bad-input and load end-to-end
# tests, then the containerd suite again against containerd 1.7 (Debian 13's binaries, unpacked, not
# installed).
# Each suite runs once: a failure fails `make test`.
test: setup guest-image build
	$(CARGO) test --release --workspace --lib --bins
	$(CARGO) test --release -p kata-rs-tests --test vm -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test containerd -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test checkpoint -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test hostile -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test faults -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test badinput -- --test-threads=1
	$(CARGO) test --release -p kata-rs-tests --test load -- --test-threads=1
	KATA_RS_CONTAINERD_BIN_DIR=$$(bash scripts/containerd17.sh) \
	  $(CARGO) test --release -p kata-rs-tests --test containerd -- --test-threads=1

bench: guest-image build
	$(CARGO) run --release -q -p kata-rs-tests --bin bench

demo: guest-image build
	$(CARGO) run --release -q -p kata-rs-tests --bin demo

clean:
	rm -rf build target
