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
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "guard.hpp"

namespace {

using Store = c10::intrusive_ptr<c10d::Store>;
using Group = c10::intrusive_ptr<c10d::ProcessGroupGloo>;

using uamt_shim::guarded;

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

// Connects to (serve = 1: serves) the store at addr:port, giving up after connect_ms. Waiting
// for the other ranks is the caller's (uamt_dist_store_add on a key of its own, between which it
// can look at its deadline and a stop request: TCPStore's own wait for workers cannot be
// interrupted). The store's operations then wait at most timeout_ms. Under torchrun the agent
// serves it and every rank is a client.
int uamt_dist_store(const char* addr, int port, int serve, int world, int64_t connect_ms, int64_t timeout_ms,
                    void** out) {
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = serve != 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = false;
    opts.timeout = ms(connect_ms);
    Store store = c10::make_intrusive<c10d::TCPStore>(std::string(addr), opts);
    store->setTimeout(ms(timeout_ms));
    *out = new Store(std::move(store));
  });
}

// Adds `delta` to the counter `key` (0: reads it); the new value in *value.
int uamt_dist_store_add(void* store, const char* key, int64_t delta, int64_t* value) {
  return guarded([&] { *value = (*static_cast<Store*>(store))->add(std::string(key), delta); });
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

// ---------------------------------------------------------------- gradients during backward
//
// An all-reduce of the gradients that starts while the backward pass still runs, as
// DistributedDataParallel's reducer does: a hook on every parameter copies its gradient into
// its bucket when autograd has computed it; a bucket whose gradients are all in is divided by
// the world size and its all-reduce launched (asynchronously, on Gloo's threads), always in
// bucket order, so every rank issues the same collectives in the same order. After backward,
// finish() waits for them and writes the means into the parameters' .grad. Buckets are in
// reverse parameter order (the order backward produces gradients in); the last one carries one
// more element, the stop vote.

namespace {

struct Reducer {
  Group group;
  int world = 1;
  int64_t timeout_ms = 0;
  std::vector<at::Tensor> params;
  std::vector<int> bucket_of;
  std::vector<int64_t> offset_of;
  std::vector<at::Tensor> flats;
  std::vector<int> count;  // parameters per bucket
  std::vector<unsigned> hooks;
  std::mutex m;
  bool armed = false;
  std::vector<int> pending;
  std::vector<bool> seen;
  size_t next = 0;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;

  void launch_ready() {
    while (next < flats.size() && pending[next] == 0) {
      flats[next].div_(world);
      std::vector<at::Tensor> ts{flats[next]};
      c10d::AllreduceOptions o;
      o.timeout = ms(timeout_ms);
      works.push_back(group->allreduce(ts, o));
      ++next;
    }
  }

  void ready(size_t i, const at::Tensor& grad) {
    std::lock_guard<std::mutex> lock(m);
    if (!armed || seen[i]) {
      return;
    }
    int b = bucket_of[i];
    int64_t n = params[i].numel();
    flats[b].narrow(0, offset_of[i], n).copy_(grad.detach().reshape({-1}));
    seen[i] = true;
    --pending[b];
    launch_ready();
  }
};

}  // namespace

extern "C" {

// A reducer over `n` parameters (at::Tensor*, in the store's order) on `group`, buckets of at
// most bucket_bytes (fp32) in reverse order; hooks are registered on the parameters.
int uamt_dist_reducer_new(void* group, void** params, int n, int64_t bucket_bytes, int64_t timeout_ms, void** out) {
  return guarded([&] {
    if (n < 1) {
      throw std::invalid_argument("the gradient reducer needs at least one parameter");
    }
    auto r = std::make_unique<Reducer>();
    r->group = *static_cast<Group*>(group);
    r->world = r->group->getSize();
    r->timeout_ms = timeout_ms;
    for (int i = 0; i < n; ++i) {
      r->params.push_back(*static_cast<at::Tensor*>(params[i]));
    }
    r->bucket_of.assign(n, 0);
    r->offset_of.assign(n, 0);
    std::vector<int64_t> sizes;
    int64_t size = 0;
    for (int i = n - 1; i >= 0; --i) {
      int64_t numel = r->params[i].numel();
      if (sizes.empty() || (size > 0 && (size + numel) * 4 > bucket_bytes)) {
        if (!sizes.empty()) {
          sizes.back() = size;
        }
        sizes.push_back(0);
        r->count.push_back(0);
        size = 0;
      }
      r->bucket_of[i] = static_cast<int>(sizes.size() - 1);
      r->offset_of[i] = size;
      r->count.back() += 1;
      size += numel;
    }
    sizes.back() = size + 1;  // the vote
    for (int64_t s : sizes) {
      r->flats.push_back(at::zeros({s}, at::TensorOptions().dtype(at::kFloat)));
    }
    Reducer* raw = r.get();
    for (int i = 0; i < n; ++i) {
      size_t idx = static_cast<size_t>(i);
      r->hooks.push_back(r->params[i].register_hook([raw, idx](const at::Tensor& g) { raw->ready(idx, g); }));
    }
    *out = r.release();
  });
}

// Arms the reducer for the next backward pass; `vote` rides in the last bucket.
int uamt_dist_reducer_arm(void* reducer, float vote) {
  return guarded([&] {
    auto* r = static_cast<Reducer*>(reducer);
    std::lock_guard<std::mutex> lock(r->m);
    r->pending = r->count;
    r->seen.assign(r->params.size(), false);
    r->next = 0;
    r->works.clear();
    auto& last = r->flats.back();
    last.narrow(0, last.numel() - 1, 1).fill_(vote);
    r->armed = true;
  });
}

// After backward: zeros for parameters that got no gradient, the remaining launches, the waits,
// the means into .grad; `*vote` receives the summed vote over the world size.
int uamt_dist_reducer_finish(void* reducer, float* vote) {
  return guarded([&] {
    auto* r = static_cast<Reducer*>(reducer);
    std::lock_guard<std::mutex> lock(r->m);
    if (!r->armed) {
      throw std::runtime_error("the gradient reducer was not armed before backward");
    }
    r->armed = false;
    for (size_t i = 0; i < r->params.size(); ++i) {
      if (!r->seen[i]) {
        int b = r->bucket_of[i];
        r->flats[b].narrow(0, r->offset_of[i], r->params[i].numel()).zero_();
        r->seen[i] = true;
        --r->pending[b];
      }
    }
    r->launch_ready();
    for (auto& w : r->works) {
      finish(w, r->timeout_ms, "all-reduce of a gradient bucket");
    }
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < r->params.size(); ++i) {
      auto& p = r->params[i];
      auto mean = r->flats[r->bucket_of[i]].narrow(0, r->offset_of[i], p.numel()).view(p.sizes());
      auto& g = p.mutable_grad();
      if (g.defined()) {
        g.copy_(mean);
      } else {
        g = mean.to(p.options()).clone();
      }
    }
    auto& last = r->flats.back();
    *vote = last[last.numel() - 1].item<float>();
  });
}

void uamt_dist_reducer_free(void* reducer) {
  auto* r = static_cast<Reducer*>(reducer);
  if (r == nullptr) {
    return;
  }
  for (size_t i = 0; i < r->hooks.size(); ++i) {
    try {
      r->params[i].remove_hook(r->hooks[i]);
    } catch (...) {
    }
  }
  delete r;
}

}  // extern "C"
