// torch.distributed's engine (c10d) for uamt's data-parallel training: what tch does not wrap.
//
// - a TCPStore for the rendezvous (rank 0 serves it at MASTER_ADDR:MASTER_PORT, as torchrun's
//   "env://" init does), optionally under a prefix so that several groups share one store;
// - ProcessGroupGloo on that store (its devices from GLOO_SOCKET_IFNAME or this host's name, as
//   PyTorch's own default), with the collectives the trainer needs: all-reduce (sum, min, max),
//   broadcast and barrier, each waited for with a timeout.
//
// The Gloo implementation is the one inside libtorch_cpu; gloo_decl/ holds the few declarations
// its header needs. Every function returns 0 on success and -1 on failure; uamt_last_error()
// (uamt_torch.cpp) then says why.

// libtorch was built with Gloo (the wheel's libtorch_cpu holds ProcessGroupGloo); its header
// declares the class only under this macro, as PyTorch's own build defines it.
#define USE_C10D_GLOO 1

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

extern "C" void uamt_set_last_error(const char* what);

namespace {

using Store = c10::intrusive_ptr<c10d::Store>;
using Group = c10::intrusive_ptr<c10d::ProcessGroupGloo>;

template <class F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    uamt_set_last_error(e.what());
  } catch (...) {
    uamt_set_last_error("unknown C++ exception");
  }
  return -1;
}

std::chrono::milliseconds ms(int64_t v) {
  return std::chrono::milliseconds(v);
}

void finish(const c10::intrusive_ptr<c10d::Work>& work, int64_t timeout_ms, const char* what) {
  if (!work->wait(ms(timeout_ms))) {
    throw std::runtime_error(std::string(what) + " did not complete within the timeout");
  }
}

}  // namespace

extern "C" {

// Connects to (serve = 1: serves) the store at addr:port and waits until all `world` ranks are
// there, for at most timeout_ms. Under torchrun the agent serves it and every rank is a client.
int uamt_dist_store(const char* addr, int port, int serve, int world, int64_t timeout_ms, void** out) {
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = serve != 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = ms(timeout_ms);
    Store store = c10::make_intrusive<c10d::TCPStore>(std::string(addr), opts);
    *out = new Store(std::move(store));
  });
}

void uamt_dist_store_free(void* store) {
  delete static_cast<Store*>(store);
}

// A Gloo process group of `world` ranks on `store`, its keys under `prefix`.
int uamt_dist_group(void* store, const char* prefix, int rank, int world, int64_t timeout_ms, void** out) {
  return guarded([&] {
    Store base = *static_cast<Store*>(store);
    Store prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), base);
    auto opts = c10d::ProcessGroupGloo::Options::create_default(ms(timeout_ms));
    Group group = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world, opts);
    *out = new Group(std::move(group));
  });
}

void uamt_dist_group_free(void* group) {
  delete static_cast<Group*>(group);
}

// op: 0 sum, 1 min, 2 max. In place on a contiguous tensor.
int uamt_dist_allreduce(void* group, void* tensor, int op, int64_t timeout_ms) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp::MIN : op == 2 ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
    o.timeout = ms(timeout_ms);
    finish((*static_cast<Group*>(group))->allreduce(ts, o), timeout_ms, "all-reduce");
  });
}

// In place: every rank's tensor becomes root's.
int uamt_dist_broadcast(void* group, void* tensor, int root, int64_t timeout_ms) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = ms(timeout_ms);
    finish((*static_cast<Group*>(group))->broadcast(ts, o), timeout_ms, "broadcast");
  });
}

int uamt_dist_barrier(void* group, int64_t timeout_ms) {
  return guarded([&] {
    c10d::BarrierOptions o;
    o.timeout = ms(timeout_ms);
    finish((*static_cast<Group*>(group))->barrier(o), timeout_ms, "barrier");
  });
}

}  // extern "C"
