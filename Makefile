# rdax: `make demo` runs the main job in the lab, `make test` runs everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST_PACKAGES := qemu-system-x86 busybox-static cpio kmod debootstrap xz-utils zstd
# Only for `make image` (the storage-node image is built with Debian 12's buildah, no registry, no daemon).
IMAGE_PACKAGES := buildah
PROTO_OUT := proto/rdax/v1/rdax_pb2.py proto/rdax/v1/rdax_pb2_grpc.py proto/rdax/v1/rdax_pb2_grpc.pyi
# mypy finds the packages under their import names here: rdax/{service,rdma,client,v1} link to the folders (the
# editable install maps them with an import hook, which mypy does not follow).
TYPECHECK := build/typecheck/rdax
# One command in the lab: make lab-shell CMD='rdma link'
CMD ?= bash -c 'rdma link; ip netns; mount | grep pmem'

.PHONY: all host-deps image-deps image venv proto lint lab soak unit-test lab-test power-test test lab-shell demo bench clean

all: proto

host-deps:
	@missing=$$(for p in $(HOST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing host packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

image-deps:
	@missing=$$(for p in $(IMAGE_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing host packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The storage-node image (docker/Dockerfile) as an OCI archive in the cache, keyed by its recipe and the code it
# holds (a warm run builds nothing); also unpacked into .lab/image for the lab's container tests. Prints its path.
image: host-deps image-deps
	@lab/build-image.sh

$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.done

# rdax_pb2_grpc.pyi (mypy-protobuf): typed stubs and servicer for mypy.
$(PROTO_OUT): proto/rdax/v1/rdax.proto $(VENV)/.done
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=proto proto/rdax/v1/rdax.proto

proto: $(PROTO_OUT)

# ruff over the tree; mypy strict on the rdax packages, looser on the tests (both configured in pyproject.toml).
# tests/lab apart: it has a conftest of its own.
lint: proto
	$(VENV)/bin/ruff check .
	@mkdir -p $(TYPECHECK)
	@for p in service rdma client; do ln -sfn ../../../$$p $(TYPECHECK)/$$p; done
	@ln -sfn ../../../proto/rdax/v1 $(TYPECHECK)/v1
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests/unit tests/power
	$(VENV)/bin/mypy tests/lab

lab: host-deps
	lab/build-root.sh >/dev/null
	lab/build-initramfs.sh >/dev/null

unit-test: proto
	$(PY) -m pytest tests/unit

lab-test: proto lab image
	mkdir -p results
	lab/run.sh 'ip netns exec storage python -m pytest -p no:cacheprovider tests/lab --junitxml=results/lab-junit.xml'

# Power loss (issue 11 §1): lab boots on one kept NVDIMM file, qemu SIGKILLed while a client writes, each cut
# checked on the next boot (tests/power; RDAX_POWER_CUTS, default 2; README: "Power loss").
power-test: proto lab
	mkdir -p results
	$(PY) -m pytest -p no:cacheprovider tests/power -s -o junit_family=xunit1 --junitxml=results/power-junit.xml

test: lint unit-test lab-test power-test

lab-shell: proto lab
	lab/run.sh "$(CMD)"

demo: proto lab
	lab/run.sh 'bash lab/demo.sh'

# Issue 11 §3: 16 writers, 4 victims broken on a schedule, Grant/Release and Seal/Unseal churn, 180 s against one node;
# results/soak.json (tests/soak/README.md). Figures, not a timed test: the lab suite's test_soak_* asserts behaviour.
SOAK_ARGS ?= --writers 16 --victims 4 --granters 2 --sealers 2 --seconds 180
soak: proto lab
	mkdir -p results
	RDAX_LAB_MEM=6G RDAX_LAB_TIMEOUT=2400 lab/run.sh 'python tests/soak/soak.py $(SOAK_ARGS) --out results/soak.json'

# One lab run, one report: perftest, rdax and the anchors (librpma, NFS v4.2 over RDMA) on the same rxe devices
# (tests/bench/run.py, a 1500 s budget; the guest is stopped at 1800 s whatever happens), then the control plane
# on the host, then the plot.
bench: proto lab
	mkdir -p results
	RDAX_LAB_TIMEOUT=1800 lab/run.sh 'python tests/bench/run.py --budget 1500 --out results/bench.json'
	$(PY) tests/bench/control_host.py results/bench.json
	$(PY) tests/bench/plot.py results/bench.json results/bench.png

clean:
	rm -rf $(VENV) results .lab $(PROTO_OUT) proto/rdax/v1/*.pyi build/typecheck .mypy_cache .ruff_cache
