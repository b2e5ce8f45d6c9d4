# signalbox developer entry points. `make test` is what CI runs.
SHELL := /bin/bash
ROOT := $(CURDIR)
BIN := $(ROOT)/.cache/bin
BUF := $(BIN)/buf
GO_TEST_FLAGS ?= -count=1 -timeout 60m

.PHONY: all build test deps tools proto proto-check lint vet unit devcluster devcluster-down kube-apiserver kube-proxy demo clean

all: build

deps:
	@tools/ci/deps.sh

build:
	go build ./...

# buf is pinned in tools/protogen/go.mod and built into .cache/bin.
$(BUF): tools/protogen/go.mod tools/protogen/go.sum
	@echo "building buf (pinned in tools/protogen/go.mod)..."
	@mkdir -p $(BIN)
	cd tools/protogen && go build -o $(BUF) github.com/bufbuild/buf/cmd/buf

GRPCURL := $(BIN)/grpcurl
$(GRPCURL): tools/protogen/go.mod tools/protogen/go.sum
	@echo "building grpcurl (pinned in tools/protogen/go.mod)..."
	@mkdir -p $(BIN)
	cd tools/protogen && go build -o $(GRPCURL) github.com/fullstorydev/grpcurl/cmd/grpcurl

tools: $(BUF) $(GRPCURL)

proto: $(BUF)
	$(BUF) lint
	$(BUF) generate

# Fails when the committed generated code is stale.
proto-check: $(BUF)
	@$(BUF) lint
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	  $(BUF) generate -o $$tmp && \
	  for f in $$(cd $$tmp && find . -name '*.pb.go'); do \
	    cmp -s $$tmp/$$f $$f || { echo "proto: $$f is stale; run 'make proto' and commit"; exit 1; }; \
	  done && echo "proto: generated code is current"

lint: proto-check vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	go vet ./...
	go vet -tags vm ./nodeagent/e2e/

kube-apiserver:
	go run ./tools/devcluster/cmd/devcluster build

kube-proxy:
	go run ./tools/devcluster/cmd/devcluster build --kube-proxy

devcluster: deps
	go run ./tools/devcluster/cmd/devcluster up

devcluster-down:
	go run ./tools/devcluster/cmd/devcluster down

# The whole suite: unit tests, the real apiserver, the network lab and the
# IPVS kernel VM. Needs root (network namespaces, iptables in them).
# The full log (-v) goes to .cache/test.log; the console shows results.
test: deps tools lint kube-apiserver
	@mkdir -p .cache
	@echo "running go test ./... (full log: .cache/test.log)"
	@go test -v $(GO_TEST_FLAGS) ./... 2>&1 | tee .cache/test.log | \
	  grep --line-buffered -E '^(ok|FAIL|--- FAIL|panic:)|^\s+\S+_test\.go:[0-9]+:'; exit $${PIPESTATUS[0]}

unit:
	go test -count=1 ./proto/... ./controlplane/... ./nodeagent/...

demo: deps tools kube-apiserver
	go run ./tools/demo

clean:
	rm -rf .cache
