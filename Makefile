# Shifter (Python): build, box, demo, tests, benchmarks.
ROOT   := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV   := $(ROOT)/.venv
PYTHON := $(VENV)/bin/python
PLUGIN := $(ROOT)/build/shifter_spank.so
LAUNCHER := $(ROOT)/build/shifter
# libsquashfuse serves the image from the launcher's own process (static: nothing to load;
# ld warns that libfuse3's module loader would need shared libraries: it is never used).
LAUNCHER_LIBS := -lsquashfuse_ll -lsquashfuse -lfuse3 -lz -llzma -lzstd -llz4 -llzo2 -lpthread -ldl

.PHONY: setup plugin launcher box box-down demo test lint typecheck bench bench-spank bench-pull bench-start bench-scale clean

plugin: $(PLUGIN)

$(PLUGIN): spank/shifter_spank.c cffi_build/build_spank.py
	$(PYTHON) cffi_build/build_spank.py --out $(PLUGIN)

# The C front end of `shifter` (executes the Python runtime's recipes; see launcher/), also
# put in place as the venv's `shifter` when that exists. Both are replaced atomically (built
# or copied aside, then renamed): a running test never sees a half-written binary.
launcher: $(LAUNCHER)
	@if [ -x $(PYTHON) ] && ! cmp -s $(LAUNCHER) $(VENV)/bin/shifter; then \
	    cp $(LAUNCHER) $(VENV)/bin/.shifter.partial && \
	    mv -f $(VENV)/bin/.shifter.partial $(VENV)/bin/shifter && \
	    echo "installed $(VENV)/bin/shifter"; fi

$(LAUNCHER): launcher/shifter_launch.c
	mkdir -p $(dir $@)
	$(CC) -O2 -Wall -Wextra -Werror -static -DSHIFTER_PYTHON='"$(PYTHON)"' -o $@.partial $< \
	    $(LAUNCHER_LIBS)
	mv -f $@.partial $@

# Debian packages, the venv (Debian's python3) with shifter_core, and the plugin.
setup:
	bash tools/box/setup.sh

# make box NODES=N: a box of N nodes (default 3, the tests' size; up to 64)
box: setup
	SHIFTER_BOX_NODES=$(NODES) $(PYTHON) tools/box/box.py up

box-down:
	@if [ -x $(PYTHON) ]; then $(PYTHON) tools/box/box.py down; else python3 tools/box/box.py down; fi

demo: box
	$(PYTHON) tools/demo.py

test: box
	$(PYTHON) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check src tests tools cffi_build setup.py

# mypy, strict, on src/ (mypy.ini)
typecheck: setup
	$(VENV)/bin/mypy

bench: bench-spank

bench-spank: box
	$(PYTHON) tools/bench/bench_spank.py

bench-srun: box
	$(PYTHON) tools/bench/bench_srun.py

# debian:bookworm to squashfs: Shifter's pull against skopeo + umoci + mksquashfs (root).
bench-pull: box
	$(PYTHON) tools/bench/bench_pull.py $(BENCH_PULL_ARGS)

# shifter --image=X true against ch-run (same squashfs) and bwrap: medians and ratios.
bench-start: box
	$(PYTHON) tools/bench/bench_start.py

# Cost of a container job against its node count: boxes of 3, 8, 16 and 32 nodes (brought up
# and down in turn; the box is left as it was found), busybox and debian:bookworm, each store
# mode, cold and warm; e.g. BENCH_SCALE_ARGS="--nodes 3,8 --modes stage,mount --json out.json"
bench-scale: setup
	$(PYTHON) tools/bench/bench_scale.py $(BENCH_SCALE_ARGS)

clean:
	rm -rf build
