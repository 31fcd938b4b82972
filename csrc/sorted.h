/* One binary search over an ascending array, for the two element types the C paths keep
 * sorted: uint32_t MSR indices (the run loop's intercepted MSRs, the MSRs routed to the C
 * event path) and uint64_t values (an emulate action's allowed values in the engine's table,
 * the `allowed` check of kvmgate/policy/handlers.py perform).  Exit-path code: no allocation,
 * no lock. */
#ifndef KVMGATE_SORTED_H
#define KVMGATE_SORTED_H

#include <stdint.h>

/* Whether a[0..n) (ascending) holds x. */
#define KG_DEFINE_SORTED_HAS(name, type)                                                       \
    static inline int name(const type *a, uint32_t n, type x)                                  \
    {                                                                                          \
        uint32_t lo = 0, hi = n;                                                               \
        while (lo < hi) {                                                                      \
            uint32_t mid = lo + (hi - lo) / 2;                                                 \
            if (a[mid] < x)                                                                    \
                lo = mid + 1;                                                                  \
            else                                                                               \
                hi = mid;                                                                      \
        }                                                                                      \
        return lo < n && a[lo] == x;                                                           \
    }

KG_DEFINE_SORTED_HAS(kg_sorted_has, uint32_t)
KG_DEFINE_SORTED_HAS(kg_sorted_has64, uint64_t)

#endif
