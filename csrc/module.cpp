// The fakespotter._C Python module: build and machine information. Tensor ops are not here:
// they are registered with the PyTorch dispatcher (ops.cpp) when this library is loaded.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace py = pybind11;
using fakespotter::cpu::Isa;

namespace {

std::vector<std::string> isa_list(bool only_supported) {
  std::vector<std::string> names;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
    if (!only_supported || fakespotter::cpu::cpu_supports(isa)) {
      names.emplace_back(fakespotter::cpu::isa_name(isa));
    }
  }
  return names;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fakespotter native library: build information (ops live in torch.ops.fakespotter)";
  m.def(
      "build_info",
      []() {
        py::dict info;
        info["version"] = FS_VERSION;
        info["torch_version"] = FS_TORCH_VERSION;
        info["cuda"] = static_cast<bool>(FS_WITH_CUDA);
        info["cuda_architectures"] = FS_CUDA_ARCHITECTURES;
        info["cpu_isa_compiled"] = isa_list(false);
        return info;
      },
      "How this library was built: versions, CUDA, the CPU variants compiled in.");
  m.def(
      "cpu_isa_supported", []() { return isa_list(true); },
      "The CPU variants this machine can run.");
  m.def(
      "cpu_isa", []() { return std::string(fakespotter::cpu::isa_name(fakespotter::cpu::selected_isa())); },
      "The CPU variant ops use now (FAKESPOTTER_CPU_ISA, else the best supported).");
}
