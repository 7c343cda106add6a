// CPU kernel variants. pack_* packs the work units [begin, end) of a PackProblem, where unit
// u = row * problem.words + word; linear_* evaluates bitset_linear for a range of rows. They differ only in the instructions they use and must agree
// bit for bit. The AVX2 and AVX-512 variants are compiled with per-function target attributes
// (never -march=native) and are only called when the CPU has them (isa.cpp).
#pragma once

#include <cstdint>
#include <string>

#include "../bitpack.h"

namespace fakespotter::cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

void pack_scalar(const PackProblem& p, int64_t begin, int64_t end);
void pack_avx2(const PackProblem& p, int64_t begin, int64_t end);
void pack_avx512(const PackProblem& p, int64_t begin, int64_t end);

// bitset_linear over rows [begin, end).
void linear_scalar(const LinearProblem& p, int64_t begin, int64_t end);
void linear_avx2(const LinearProblem& p, int64_t begin, int64_t end);
void linear_avx512(const LinearProblem& p, int64_t begin, int64_t end);

const char* isa_name(Isa isa);
bool cpu_supports(Isa isa);
// The variant to use: FAKESPOTTER_CPU_ISA (scalar | avx2 | avx512 | auto) if set, else the best
// this CPU supports. Forcing a variant the CPU lacks raises a ValueError.
Isa selected_isa();

}  // namespace fakespotter::cpu
