# The sandbox's `compile` workload: a real C build with the guest's gcc, make -jN.
#
# The source is the Linux kernel's scripts/dtc (the device-tree compiler and libfdt, a standalone C
# project the kernel keeps a copy of), taken from the same linux-source package as the sched_ext
# headers. This builds what the kernel's own scripts/dtc/Makefile builds from the tarball: libfdt,
# fdtoverlay linked against it, and dtc's objects (dtc itself is not linked: its flex lexer and bison
# parser are generated at build time and the tarball does not carry them).
#
#   make -C SRC O=OUTDIR -jN [all|quick]
#
# `quick` is what the sandbox workload times: four of libfdt's translation units, archived. Under qemu
# TCG each gcc (cc1) start costs ~0.7 s before it compiles a line, so the whole build (19 TUs and a
# link) took 25-30 s there at -O0 and 60 s at -O1; `quick` takes ~2-4 s with make -j4 on 2 vCPUs.
# With KVM `all` is the better-sized build. Objects go to $(O), never into the source tree, so runs
# need no clean and may share the tree.
O ?= out
OPT ?= -O2
CC = gcc
CFLAGS = $(OPT) -Wall -Wno-unused-result -Ilibfdt -I. $(DEPFLAGS)

LIBFDT = fdt fdt_ro fdt_wip fdt_sw fdt_rw fdt_strerror fdt_empty_tree fdt_addresses fdt_overlay
DTC = dtc flattree fstree data livetree treesource srcpos checks util

QUICK = fdt_strerror fdt_empty_tree fdt_addresses fdt_wip

all: $(O)/fdtoverlay $(DTC:%=$(O)/%.o)

quick: $(O)/quick.a

$(O)/quick.a: $(QUICK:%=$(O)/libfdt/%.o)
	$(AR) rcs $@ $^

$(O)/fdtoverlay: $(O)/fdtoverlay.o $(O)/util.o $(O)/libfdt.a
	$(CC) $(LDFLAGS) -o $@ $^

$(O)/libfdt.a: $(LIBFDT:%=$(O)/libfdt/%.o)
	$(AR) rcs $@ $^

$(O)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

.PHONY: all quick
