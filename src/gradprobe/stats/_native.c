/* The CPU statistics kernels of gradprobe.stats.native: every field of a statistics row in one
 * pass over the elements (the eager path takes six reductions), built on first use with the
 * system's C compiler and loaded with ctypes. Portable C with GCC/Clang vector extensions; no
 * -ffast-math (NaN and Inf must count as they are). The row layout is that of
 * gradprobe.stats.schema (checked against the eager path when the library is loaded). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

enum { GP_SUM, GP_SUMSQ, GP_ABS_SUM, GP_NONZERO, GP_NONFINITE, GP_SATURATED, GP_DEAD,
       GP_REF_SUMSQ, GP_NEG_MIN, GP_MAX, GP_NSTATS };

#if defined(__AVX512F__)
#define GP_BYTES 64
#elif defined(__AVX__)
#define GP_BYTES 32
#else
#define GP_BYTES 16
#endif

int gp_layout(void) { return GP_NSTATS * 100 + GP_BYTES; }

typedef float gp_vf __attribute__((vector_size(GP_BYTES)));
typedef int32_t gp_vi __attribute__((vector_size(GP_BYTES)));
typedef double gp_vd __attribute__((vector_size(GP_BYTES)));
typedef int64_t gp_vl __attribute__((vector_size(GP_BYTES)));

#define GP_T float
#define GP_V gp_vf
#define GP_I gp_vi
#define GP_L (GP_BYTES / 4)
#define GP_ABS 0x7fffffff
#define GP_SUF f32
#include "_native_body.h"
#undef GP_T
#undef GP_V
#undef GP_I
#undef GP_L
#undef GP_ABS
#undef GP_SUF

#define GP_T double
#define GP_V gp_vd
#define GP_I gp_vl
#define GP_L (GP_BYTES / 8)
#define GP_ABS 0x7fffffffffffffffLL
#define GP_SUF f64
#include "_native_body.h"
