# parallelize - build, test, run, install.
#
#   make run        install what is missing, build, run the main demo
#   make test       install what is missing, build, run every test but the
#                   sanitizer pass (a few minutes)
#   make check      make test plus the suite under ASan and UBSan (what CI runs)
#   make install PREFIX=/some/dir   (DESTDIR honoured)
#   make bench | soak | soak-interrupts | fuzz | valgrind | lint | clean
#
# Variables are `?=` so the command line, the environment or LuaRocks can
# override them; user CFLAGS are added to the required flags, never replace them.
#
# Two rules keep the first run on a new machine working:
# - Targets that install Debian packages (run, test, check, bench, soak, fuzz,
#   valgrind) do the rest of their work in a second make, started after the
#   install, so that nothing is built before what it needs is there, even
#   under -j.
# - Nothing is computed from installed packages while make reads this file:
#   such values (LuaJIT's include directory and libraries) are computed the
#   first time a recipe uses them (see `lazy` below).

PREFIX    ?= /usr/local
BINDIR    ?= $(PREFIX)/bin
LIBDIR    ?= $(PREFIX)/lib/lua/5.1
LUADIR    ?= $(PREFIX)/share/lua/5.1
DESTDIR   ?=

CC        ?= cc
# Link-time optimization: the worker's per-call path crosses files (the
# codec's fast paths, the output's lock), and inlined across them a tiny
# call took 10% less of a worker's CPU (2,000,000 calls, 8 alternated
# rounds; 200,000 calls: 15.7 M/s against 14.4, 20 rounds). LuaRocks
# passes its own CFLAGS, without it.
CFLAGS    ?= -O2 -g -flto=auto
LDFLAGS   ?= -flto=auto
LIBFLAG   ?= -shared
LUAJIT    ?= luajit
BUSTED    ?= busted --lua=$(LUAJIT)
# The second make (see above); quiet about targets already up to date.
SUBMAKE    = $(MAKE) --no-print-directory $(if $(filter 1,$(V)),,-s)

# -Werror is for development and CI (make, make test). Builds that install
# (make install, LuaRocks) leave it out: they run the user's compiler, whose
# newer warnings must not break an install. WERROR= turns it off anywhere.
WERROR    ?= -Werror

# LuaRocks passes LUA_INCDIR; the code needs LuaJIT's headers, so when the
# directory given is not LuaJIT's, fall back to what pkg-config knows. Both
# values are computed at their first use and kept (`X = $(eval X := ...)$(X)`),
# never while make reads this file, before `deps` could install LuaJIT.
LUA_INCDIR ?= /usr/include/luajit-2.1
PZ_INC = $(eval PZ_INC := $(strip $(if $(wildcard $(LUA_INCDIR)/luajit.h),$(LUA_INCDIR),$\
    $(shell pkg-config --cflags-only-I luajit 2>/dev/null | sed 's/^-I//'))))$(PZ_INC)
LUAJIT_LIBS ?= $(eval LUAJIT_LIBS := $(shell pkg-config --libs luajit 2>/dev/null || echo -lluajit-5.1))$(LUAJIT_LIBS)

# -I for LuaJIT's headers, or a stop that says what to do.
LUAJIT_INC_FLAG = -I$(or $(PZ_INC),$(error LuaJIT's headers (luajit.h) are neither in $(LUA_INCDIR) \
    nor known to pkg-config: `make deps` installs them (Debian: libluajit-5.1-dev)))

PZ_CFLAGS = -std=c11 -D_GNU_SOURCE -Wall -Wextra $(WERROR) -Wshadow -Wstrict-prototypes \
            -fPIC -fvisibility=hidden -pthread $(LUAJIT_INC_FLAG) -Isrc -Ibuild
SAN_FLAGS = -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer

PZLUA_SRC = src/pzlua.c src/pzlua_repl.c
CORE_SRC  = $(filter-out $(PZLUA_SRC),$(sort $(wildcard src/*.c)))
HEADERS   = $(wildcard src/*.h)
LUA_SRC   = lua/parallelize.lua $(sort $(wildcard lua/parallelize/*.lua))
CORE_OBJ  = $(CORE_SRC:src/%.c=build/obj/%.o)
ASAN_OBJ  = $(CORE_SRC:src/%.c=build/asan/obj/%.o)
VG_OBJ    = $(CORE_SRC:src/%.c=build/valgrind/obj/%.o)

ifeq ($(V),1)
Q =
else
Q = @
endif

.PHONY: all build deps deps-build deps-test deps-fuzz deps-bench deps-valgrind run test check install uninstall clean lint bench soak soak-interrupts fuzz valgrind asan spec

all build: build/parallelize/core.so build/pzlua

build/obj/%.o: src/%.c $(HEADERS) | build/obj
	@echo "  CC      $<"
	$(Q)$(CC) $(PZ_CFLAGS) $(CFLAGS) -c -o $@ $<

build/asan/obj/%.o: src/%.c $(HEADERS) | build/asan/obj
	@echo "  CC/SAN  $<"
	$(Q)$(CC) $(PZ_CFLAGS) $(SAN_FLAGS) -O1 -g -c -o $@ $<

# The C module does not link libluajit: the host interpreter provides it.
build/parallelize/core.so: $(CORE_OBJ) | build/parallelize
	@echo "  LD      $@"
	$(Q)$(CC) $(LIBFLAG) $(LDFLAGS) -pthread -o $@ $(CORE_OBJ)

# The Lua layer, compiled into pzlua so it needs no LUA_PATH.
build/embedded_lua.c: $(LUA_SRC) tools/embed.lua | build/obj
	@echo "  EMBED   $@"
	$(Q)$(LUAJIT) tools/embed.lua $@ $(LUA_SRC)

build/obj/embedded_lua.o: build/embedded_lua.c | build/obj
	$(Q)$(CC) $(PZ_CFLAGS) $(CFLAGS) -Wno-overlength-strings -c -o $@ $<

build/pzlua: $(PZLUA_SRC:src/%.c=build/obj/%.o) build/obj/embedded_lua.o $(CORE_OBJ)
	@echo "  LD      $@"
	$(Q)$(CC) $(LDFLAGS) -pthread -o $@ $^ $(LUAJIT_LIBS) -lm -ldl

# pzlua with AddressSanitizer and UBSan: the spec suite runs under it.
build/asan/pzlua: $(PZLUA_SRC) src/pzlua.h build/embedded_lua.c $(ASAN_OBJ) | build/asan/obj
	@echo "  LD/SAN  $@"
	$(Q)$(CC) $(PZ_CFLAGS) $(SAN_FLAGS) -O1 -g -Wno-overlength-strings -o $@ \
	    $(PZLUA_SRC) build/embedded_lua.c $(ASAN_OBJ) $(LUAJIT_LIBS) -lm -ldl

asan: build/asan/pzlua

# pzlua for valgrind (make valgrind): its Lua states allocate with malloc,
# so that memcheck sees each Lua object, userdata included, as a block of
# its own (see src/lstate.h); -O1 keeps its stacks readable.
VG_FLAGS = -DPZ_MALLOC_STATES -O1 -g -fno-omit-frame-pointer

build/valgrind/obj/%.o: src/%.c $(HEADERS) | build/valgrind/obj
	@echo "  CC/VG   $<"
	$(Q)$(CC) $(PZ_CFLAGS) $(VG_FLAGS) -c -o $@ $<

build/valgrind/pzlua: $(PZLUA_SRC) src/pzlua.h build/embedded_lua.c $(VG_OBJ) | build/valgrind/obj
	@echo "  LD/VG   $@"
	$(Q)$(CC) $(PZ_CFLAGS) $(VG_FLAGS) -Wno-overlength-strings -o $@ \
	    $(PZLUA_SRC) build/embedded_lua.c $(VG_OBJ) $(LUAJIT_LIBS) -lm -ldl

build build/obj build/asan/obj build/valgrind/obj build/parallelize:
	$(Q)mkdir -p $@

# Debian packages, one list per purpose. Each `deps-*` target installs its
# lists with apt-get (through sudo when not root), only when one of their
# packages is missing: a second run installs nothing.
DEB_PACKAGES_BUILD = gcc libc6-dev make pkg-config luajit libluajit-5.1-dev
DEB_PACKAGES_TEST  = lua-busted lua-check luarocks lua-cjson lua5.1
DEB_PACKAGES_FUZZ  = clang libclang-rt-14-dev
DEB_PACKAGES_BENCH = python3 parallel
DEB_PACKAGES_VALGRIND = valgrind
# The servers the specs start themselves (spec/servers.lua), installed by a
# script that keeps their install scripts from starting any service.
DEB_PACKAGES_SERVERS = openssh-server openssh-client munge slurmctld slurmd slurm-client iproute2 iptables

define install_missing
	@missing=""; for p in $(1); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    SUDO=""; \
	    if [ "$$(id -u)" != 0 ]; then \
	        command -v sudo >/dev/null || { echo "make $@: installing needs root: run it as root, or install sudo"; exit 1; }; \
	        SUDO=sudo; \
	    fi; \
	    $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

deps-build:
	$(call install_missing,$(DEB_PACKAGES_BUILD))
deps deps-test:
	$(call install_missing,$(DEB_PACKAGES_BUILD) $(DEB_PACKAGES_TEST))
	$(Q)sh tools/install-servers.sh $(DEB_PACKAGES_SERVERS)
deps-fuzz:
	$(call install_missing,$(DEB_PACKAGES_BUILD) $(DEB_PACKAGES_TEST) $(DEB_PACKAGES_FUZZ))
deps-bench:
	$(call install_missing,$(DEB_PACKAGES_BUILD) $(DEB_PACKAGES_TEST) $(DEB_PACKAGES_BENCH))
deps-valgrind:
	$(call install_missing,$(DEB_PACKAGES_BUILD) $(DEB_PACKAGES_TEST) $(DEB_PACKAGES_VALGRIND))

run: deps-build
	$(Q)$(SUBMAKE) all
	$(Q)PZ_SLEEP_SCALE=0.1 build/pzlua examples/sleeper.lua

# The sanitizer pass (tools/run-tests.sh, step c) doubles the suite's time,
# so `make test` leaves it to `make check`, which CI runs.
test: deps-test
	$(Q)$(SUBMAKE) all
	$(Q)LUAJIT="$(LUAJIT)" PZ_TEST_STEPS=abdef sh tools/run-tests.sh

check: deps-test
	$(Q)$(SUBMAKE) all asan
	$(Q)LUAJIT="$(LUAJIT)" PZ_TEST_STEPS=abcdef sh tools/run-tests.sh

# One spec file (or all) against the normal build, for development.
spec: all
	$(Q)LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/?.so;;" $(BUSTED) $(or $(SPEC),spec)

lint:
	$(Q)luacheck -q lua spec examples bench tools

install: WERROR =
install: all
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR)/parallelize $(DESTDIR)$(LUADIR)/parallelize
	install -m 755 build/pzlua $(DESTDIR)$(BINDIR)/pzlua
	install -m 755 build/parallelize/core.so $(DESTDIR)$(LIBDIR)/parallelize/core.so
	install -m 644 lua/parallelize.lua $(DESTDIR)$(LUADIR)/parallelize.lua
	$(if $(wildcard lua/parallelize/*.lua),install -m 644 $(wildcard lua/parallelize/*.lua) $(DESTDIR)$(LUADIR)/parallelize/)

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/pzlua $(DESTDIR)$(LIBDIR)/parallelize/core.so $(DESTDIR)$(LUADIR)/parallelize.lua
	rm -rf $(DESTDIR)$(LUADIR)/parallelize

bench: deps-bench
	$(Q)$(SUBMAKE) all
	$(Q)sh bench/run.sh

soak: deps-test
	$(Q)$(SUBMAKE) all
	$(Q)LUA_PATH="lua/?.lua;;" LUA_CPATH="build/?.so;;" $(LUAJIT) spec/soak/soak.lua
	$(Q)LUA_PATH="lua/?.lua;;" LUA_CPATH="build/?.so;;" $(LUAJIT) spec/soak/interrupts.lua

# Hundreds of Ctrl-Cs at random moments (spec/soak/interrupts.lua).
soak-interrupts: deps-test
	$(Q)$(SUBMAKE) all
	$(Q)LUA_PATH="lua/?.lua;;" LUA_CPATH="build/?.so;;" $(LUAJIT) spec/soak/interrupts.lua

# The workloads of spec/valgrind/ under valgrind's memcheck, forked workers
# and the spawner included (tools/run-valgrind.sh); not part of `make test`.
valgrind: deps-valgrind
	$(Q)$(SUBMAKE) build/valgrind/pzlua build/valgrind/fuzz/fuzz_value build/valgrind/fuzz/fuzz_frame
	$(Q)sh tools/run-valgrind.sh

# libFuzzer harnesses for the value decoder and the frame decoder.  Each
# links only the sources it tests (listed below), so that nothing else is
# instrumented or pulled in.  UBSan findings abort, so libFuzzer keeps them.
FUZZ_SECONDS ?= 60
FUZZ_CC ?= clang
FUZZ_FLAGS = -std=c11 -D_GNU_SOURCE -g -O1 -Wall -Wextra -Werror \
             -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
             $(LUAJIT_INC_FLAG) -Isrc
FUZZ_SRC_fuzz_value = $(wildcard src/codec_*.c) src/lcodec.c
FUZZ_SRC_fuzz_frame = src/frame.c src/handshake.c
build/fuzz/fuzz_value: $(FUZZ_SRC_fuzz_value)
build/fuzz/fuzz_frame: $(FUZZ_SRC_fuzz_frame)
build/fuzz/%: spec/fuzz/%.c $(HEADERS)
	@mkdir -p build/fuzz
	@echo "  FUZZ    $@"
	$(Q)$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $(filter %.c,$^) $(LUAJIT_LIBS) -lm -ldl -pthread

# The same harnesses without libFuzzer or sanitizers, for valgrind: a plain
# main (spec/fuzz/seed_driver.c) runs each file of a seed corpus once.
build/valgrind/fuzz/fuzz_value: $(FUZZ_SRC_fuzz_value)
build/valgrind/fuzz/fuzz_frame: $(FUZZ_SRC_fuzz_frame)
build/valgrind/fuzz/%: spec/fuzz/%.c spec/fuzz/seed_driver.c $(HEADERS)
	@mkdir -p build/valgrind/fuzz
	@echo "  CC/VG   $@"
	$(Q)$(CC) $(PZ_CFLAGS) $(VG_FLAGS) -o $@ $(filter %.c,$^) $(LUAJIT_LIBS) -lm -ldl
fuzz: deps-fuzz
	$(Q)$(SUBMAKE) build/fuzz/fuzz_value build/fuzz/fuzz_frame
	$(Q)for f in fuzz_value fuzz_frame; do \
	    mkdir -p build/fuzz/corpus_$$f; \
	    build/fuzz/$$f -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 build/fuzz/corpus_$$f spec/fuzz/seeds_$$f || exit 1; \
	done

clean:
	rm -rf build
