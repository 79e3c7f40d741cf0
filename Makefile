# Open Site Recovery — the two commands a newcomer needs are `make run` and `make test`.
# Each target installs what is missing (scripts/bootstrap) and builds first.

BUILD      ?= build
BUILD_ASAN ?= build-asan
BUILD_FUZZ ?= build-fuzz
JOBS       ?= $(shell nproc)
FUZZ_SECONDS ?= 20
RUN_DIR    ?= osr-data
PYTHON     := /usr/bin/python3
# The catalog of the vaults the e2e and site suites start: sqlite (a file) or postgresql
# (one PostgreSQL 15 server per suite, a fresh database per vault). `make test` on SQLite
# also runs every workflow once on PostgreSQL; `make test VAULT_DB=postgresql` runs every
# suite on PostgreSQL; `make test-postgres` the whole e2e suite and the site tests that
# start a vault, on PostgreSQL, on the release build.
VAULT_DB   ?= sqlite

.PHONY: all bootstrap build web asan fuzz-build run test test-unit test-release test-asan test-postgres fuzz bench format clean

all: build web

bootstrap:
	@scripts/bootstrap

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo

$(BUILD_ASAN)/build.ninja:
	cmake -S . -B $(BUILD_ASAN) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DOSR_SANITIZE=ON

$(BUILD_FUZZ)/build.ninja:
	CC=clang CXX=clang++ cmake -S . -B $(BUILD_FUZZ) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOSR_FUZZ=ON

build: bootstrap $(BUILD)/build.ninja
	ninja -C $(BUILD) -j $(JOBS)

# The web UI (web/, Vite): its bundle in web/dist, which the vault serves.
web: bootstrap
	npm run build --prefix web --silent -- --logLevel warn

asan: bootstrap $(BUILD_ASAN)/build.ninja
	ninja -C $(BUILD_ASAN) -j $(JOBS)

fuzz-build: bootstrap $(BUILD_FUZZ)/build.ninja
	ninja -C $(BUILD_FUZZ) -j $(JOBS)

# The quickstart: a vault on 127.0.0.1:7480 and two sites, primary and recovery, with
# their state in $(RUN_DIR). It prints what to try; Ctrl-C stops it.
run: build web
	@echo "CLI: $(BUILD)/osr (export PATH=$$PWD/$(BUILD):$$PATH to type just osr)"
	$(BUILD)/osrd quickstart --dir $(RUN_DIR)

# Every test: unit tests and real-client tests on the release build, the same again on
# the ASan/UBSan build, then each fuzz target for FUZZ_SECONDS.
test: test-release test-asan fuzz

test-release: build web
	OSR_TEST_VAULT_DB=$(VAULT_DB) ctest --test-dir $(BUILD) --output-on-failure --timeout 900

test-asan: asan
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    OSR_TEST_VAULT_DB=$(VAULT_DB) ctest --test-dir $(BUILD_ASAN) --output-on-failure --timeout 1200

# The vaults' catalog on PostgreSQL: the whole e2e suite, and the site tests that start a
# vault (the other site tests never open a catalog), on the release build.
PG_SITE_TESTS := tests/site/test_dr_daemons.py tests/site/test_commands.py tests/site/test_vault_postgres.py

test-postgres: build
	OSRD=$(CURDIR)/$(BUILD)/osrd OSR=$(CURDIR)/$(BUILD)/osr \
	    $(PYTHON) -m pytest -q -p no:cacheprovider --vault-db=postgresql tests/e2e
	OSRD=$(CURDIR)/$(BUILD)/osrd OSR=$(CURDIR)/$(BUILD)/osr \
	    $(PYTHON) -m pytest -q -p no:cacheprovider --vault-db=postgresql $(PG_SITE_TESTS)

fuzz: fuzz-build
	@passed=0; for t in fuzz_nbd_session fuzz_capture_log fuzz_replication_hello fuzz_json_bodies; do \
	  mkdir -p $(BUILD_FUZZ)/corpus/$$t; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
	  $(BUILD_FUZZ)/$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=0 -rss_limit_mb=2048 \
	      $(BUILD_FUZZ)/corpus/$$t tests/fuzz/seeds/$$t > $(BUILD_FUZZ)/$$t.log 2>&1; rc=$$?; \
	  if [ $$rc -ne 0 ]; then tail -n 60 $(BUILD_FUZZ)/$$t.log; echo "fuzz: $$passed passed, 1 failed"; exit 1; fi; \
	  tail -n 1 $(BUILD_FUZZ)/$$t.log; passed=$$((passed + 1)); \
	done; echo "fuzz: $$passed passed, 0 failed"

bench: build
	$(PYTHON) bench/nbd_bench.py --osrd $(BUILD)/osrd
	$(PYTHON) bench/replication_bench.py --osrd $(BUILD)/osrd --bs 1M,4k
	$(PYTHON) bench/failover_bench.py --osrd $(BUILD)/osrd
	$(PYTHON) bench/store_scale.py --osrd $(BUILD)/osrd
	$(PYTHON) bench/vault_scale.py --osrd $(BUILD)/osrd

format:
	clang-format -i $$(git ls-files '*.cc' '*.h')

clean:
	rm -rf $(BUILD) $(BUILD_ASAN) $(BUILD_FUZZ)
