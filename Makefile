# Ferrule's developer entry points (POSIX make). `make help` lists them.
#
# Binaries are built into $CARGO_TARGET_DIR when it is set, ./target otherwise; the end-to-end
# tests spawn them from its debug/ folder.

.POSIX:
.SUFFIXES:

CARGO = cargo
# command:Debian-package pairs that `make deps` installs when the command is missing. A command
# given as an absolute path (a glob is fine) is looked for there instead of on PATH: Debian keeps
# PostgreSQL's server binaries under /usr/lib/postgresql/<version>/bin, off PATH.
DEPS = protoc:protobuf-compiler etcd:etcd-server iptables:iptables wrk:wrk h2load:nghttp2-client \
	/usr/lib/postgresql/*/bin/initdb:postgresql chromium:chromium python3:python3 \
	/usr/lib/python3/dist-packages/pip:python3-pip
# What only `make bench` needs besides: the peers it compares with, perf and curl.
BENCH_DEPS = nginx:nginx haproxy:haproxy perf:linux-perf curl:curl valgrind:valgrind

help:
	@echo 'Ferrule make targets:'
	@echo '  make demo    build release binaries and run the sample shop as a local mesh'
	@echo '               (ferrule dev up), printing what to try from another shell'
	@echo '  make test    deps, then fmt check, clippy -D warnings, build, and every test'
	@echo '               (cargo-nextest profile "ci" when installed, cargo test otherwise)'
	@echo '  make build   debug build of every binary'
	@echo '  make release release build of every binary'
	@echo '  make bench   deps, then bench/run.sh: direct vs nginx, HAProxy and Ferrule pairs side by'
	@echo '               side (bench/results/latest.md and .png; BENCH_* settings in bench/README.md,'
	@echo '               BENCH_BASELINE_REV=REV adds the proxy built at REV) and bench/config.sh'
	@echo '               (config propagation: bench/results/config.md), bench/cp-scale.sh (10,000'
	@echo '               watch streams, 100 proxies: bench/results/config-scale.md) and'
	@echo '               bench/tracing.sh (tracing off, sampled 0/1/100 %: bench/results/tracing-cost.md)'
	@echo '               and bench/cost.sh (instructions and allocations per request of each sidecar,'
	@echo '               valgrind: bench/results/cost-client-h1.txt, cost-server-h1.txt)'
	@echo '  make k8s-validate  validate k8s/ and injected pods against Kubernetes 1.29/1.31/1.33'
	@echo '  make deps    apt-get install what is missing of: protobuf-compiler, etcd-server,'
	@echo '               iptables, wrk, nghttp2-client, postgresql, chromium, python3-pip (root;'
	@echo '               otherwise prints the sudo command) and the Python package playwright;'
	@echo '               make bench also installs nginx, haproxy, linux-perf, curl, valgrind'
	@echo '  make clean   remove build output'
	@echo '  make help    this list'

deps:
	@command -v $(CARGO) >/dev/null 2>&1 || { \
	  echo 'make deps: cargo is not installed; install Rust (https://rustup.rs) first' >&2; exit 1; }
	@missing=''; \
	for pair in $(DEPS); do \
	  cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  case "$$cmd" in \
	    /*) found=''; for path in $$cmd; do [ -x "$$path" ] && found=1; done; \
	        [ -n "$$found" ] || missing="$$missing $$pkg";; \
	    *) command -v "$$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$$cmd" ] || [ -x "/sbin/$$cmd" ] \
	         || missing="$$missing $$pkg";; \
	  esac; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then \
	    echo "make deps: missing Debian packages:$$missing" >&2; \
	    echo "make deps: run: sudo apt-get update && sudo apt-get install -y$$missing" >&2; \
	    exit 1; \
	  fi; \
	  echo "make deps: installing$$missing"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi
	@python3 -c 'import playwright.sync_api' 2>/dev/null || { \
	  echo 'make deps: installing the Python package playwright (the dashboard test drives chromium with it)'; \
	  python3 -m pip install --quiet playwright \
	    || python3 -m pip install --quiet --break-system-packages playwright; }
	@$(CARGO) nextest --version >/dev/null 2>&1 \
	  || echo 'make deps: cargo-nextest is not installed; make test falls back to cargo test'

build:
	$(CARGO) build --workspace --bins

test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --bins
	@$(MAKE) --no-print-directory k8s-validate
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  echo '$(CARGO) nextest run --workspace --profile ci'; \
	  $(CARGO) nextest run --workspace --profile ci; \
	else \
	  echo '$(CARGO) test --workspace'; \
	  $(CARGO) test --workspace; \
	fi

# Every Kubernetes manifest (kustomize base, shop, overlays, components), `ferrule install`'s
# output, the shop as `ferrule inject` rewrites it and the injector's golden files, validated
# strictly against the schemas of Kubernetes 1.29, 1.31 and 1.33 (k8s/validate.sh; needs
# kubectl for `kubectl kustomize`, installs kubernetes-validate from PyPI into a venv in the
# target dir). Uses the debug `ferrule` when it is built.
k8s-validate:
	@target="$${CARGO_TARGET_DIR:-target}"; bin="$$target/debug/ferrule"; \
	[ -x "$$bin" ] || { echo 'make k8s-validate: no debug ferrule built: skipping install/inject output'; bin=''; }; \
	FERRULE="$$bin" sh k8s/validate.sh "$$target/venv-k8s"

release: deps
	$(CARGO) build --workspace --release --bins

# The sample shop as a local mesh: controller, user (x2), order, payment, a sidecar each and
# the gateway on 127.0.0.1:8000, until Ctrl-C. State and logs go to .ferrule/dev/.
demo: release
	@bin="$${CARGO_TARGET_DIR:-target}/release"; \
	exec "$$bin/ferrule" dev up

# bench/run.sh builds only what it runs (ferrule-proxy and the bench backend), bench/config.sh
# the controller side; neither needs the whole workspace built first.
bench: deps
	@$(MAKE) --no-print-directory deps DEPS='$(BENCH_DEPS)'
	mkdir -p bench/results
	bash bench/run.sh
	bash bench/config.sh
	bash bench/cp-scale.sh
	bash bench/tracing.sh
	bash bench/cost.sh
	COST_SIDE=server bash bench/cost.sh
	@echo 'make bench: results in bench/results/latest.md, config.md, config-scale.md, tracing-cost.md and cost-*.txt'

clean:
	$(CARGO) clean

.PHONY: help deps build test release demo bench clean k8s-validate
