#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "kernels.h"

namespace fakespotter::cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
    default:
      return "scalar";
  }
}

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  switch (isa) {
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
             __builtin_cpu_supports("f16c");
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    default:
      return true;
  }
#else
  return isa == Isa::Scalar;
#endif
}

Isa selected_isa() {
  const char* env = std::getenv("FAKESPOTTER_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
    if (cpu_supports(Isa::Avx512)) return Isa::Avx512;
    if (cpu_supports(Isa::Avx2)) return Isa::Avx2;
    return Isa::Scalar;
  }
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
    if (want == isa_name(isa)) {
      TORCH_CHECK_VALUE(cpu_supports(isa), "FAKESPOTTER_CPU_ISA=", want,
                        " asks for a variant this CPU does not support");
      return isa;
    }
  }
  TORCH_CHECK_VALUE(false, "FAKESPOTTER_CPU_ISA must be auto, scalar, avx2 or avx512, got '", want,
                    "'");
  return Isa::Scalar;  // unreachable
}

}  // namespace fakespotter::cpu
