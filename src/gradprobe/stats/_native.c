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

/* Lane-wise minimum and maximum of (v, acc) that keep acc where v is NaN (NaN is handled after
 * the pass): the x86 min/max instructions do exactly that; elsewhere (or built with
 * -DGP_PORTABLE, as the tests do to check this path) a select. */
#if !defined(GP_PORTABLE) && (defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__))
#include <immintrin.h>
#endif
#if defined(GP_PORTABLE)
#elif defined(__AVX512F__)
#define GP_MIN_f32(a, b) ((gp_vf)_mm512_min_ps((__m512)(a), (__m512)(b)))
#define GP_MAX_f32(a, b) ((gp_vf)_mm512_max_ps((__m512)(a), (__m512)(b)))
#define GP_MIN_f64(a, b) ((gp_vd)_mm512_min_pd((__m512d)(a), (__m512d)(b)))
#define GP_MAX_f64(a, b) ((gp_vd)_mm512_max_pd((__m512d)(a), (__m512d)(b)))
#elif defined(__AVX__)
#define GP_MIN_f32(a, b) ((gp_vf)_mm256_min_ps((__m256)(a), (__m256)(b)))
#define GP_MAX_f32(a, b) ((gp_vf)_mm256_max_ps((__m256)(a), (__m256)(b)))
#define GP_MIN_f64(a, b) ((gp_vd)_mm256_min_pd((__m256d)(a), (__m256d)(b)))
#define GP_MAX_f64(a, b) ((gp_vd)_mm256_max_pd((__m256d)(a), (__m256d)(b)))
#elif defined(__SSE2__)
#define GP_MIN_f32(a, b) ((gp_vf)_mm_min_ps((__m128)(a), (__m128)(b)))
#define GP_MAX_f32(a, b) ((gp_vf)_mm_max_ps((__m128)(a), (__m128)(b)))
#define GP_MIN_f64(a, b) ((gp_vd)_mm_min_pd((__m128d)(a), (__m128d)(b)))
#define GP_MAX_f64(a, b) ((gp_vd)_mm_max_pd((__m128d)(a), (__m128d)(b)))
#endif
#ifndef GP_MIN_f32
#define GP_SEL(m, a, b, V, I) ((V)(((I)(m) & (I)(a)) | (~(I)(m) & (I)(b))))
#define GP_MIN_f32(a, b) GP_SEL((a) < (b), a, b, gp_vf, gp_vi)
#define GP_MAX_f32(a, b) GP_SEL((a) > (b), a, b, gp_vf, gp_vi)
#define GP_MIN_f64(a, b) GP_SEL((a) < (b), a, b, gp_vd, gp_vl)
#define GP_MAX_f64(a, b) GP_SEL((a) > (b), a, b, gp_vd, gp_vl)
#endif

#define GP_T float
#define GP_V gp_vf
#define GP_I gp_vi
#define GP_L (GP_BYTES / 4)
#define GP_ABS 0x7fffffff
#define GP_SUF f32
#define GP_MINV GP_MIN_f32
#define GP_MAXV GP_MAX_f32
#include "_native_body.h"
#undef GP_T
#undef GP_V
#undef GP_I
#undef GP_L
#undef GP_ABS
#undef GP_SUF
#undef GP_MINV
#undef GP_MAXV

#define GP_T double
#define GP_V gp_vd
#define GP_I gp_vl
#define GP_L (GP_BYTES / 8)
#define GP_ABS 0x7fffffffffffffffLL
#define GP_SUF f64
#define GP_MINV GP_MIN_f64
#define GP_MAXV GP_MAX_f64
#include "_native_body.h"
