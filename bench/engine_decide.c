/* Per-decision cost of kg_decide in C (no Python): a table built by kvmgate (file argv[1]),
 * the exits of argv[2] (binary: u32 index, u32 is_write, u32 reason, u32 pad, u64 data each),
 * repeated argv[3] times.  Prints ns per decision.  Built by bench/engine_decide.py. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "engine.h"

struct ex { uint32_t index, is_write, reason, pad; uint64_t data; };

static void *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = aligned_alloc(64, ((size_t)n + 63) & ~(size_t)63);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

int main(int argc, char **argv)
{
    if (argc != 4) { fprintf(stderr, "usage: engine_decide TABLE EXITS REPEAT\n"); return 2; }
    size_t tlen, elen;
    void *t = slurp(argv[1], &tlen);
    struct ex *e = slurp(argv[2], &elen);
    long repeat = atol(argv[3]);
    if (!t || !e || kg_table_validate(t, tlen) != KG_OK) { fprintf(stderr, "bad input\n"); return 1; }
    size_t n = elen / sizeof *e;
    void *s = aligned_alloc(16, kg_state_size(KG_STATE_DEFAULT_SLOTS));
    kg_state_init(s, kg_state_size(KG_STATE_DEFAULT_SLOTS), KG_STATE_DEFAULT_SLOTS);
    struct timespec a, b;
    uint64_t sink = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long r = 0; r < repeat; r++)
        for (size_t i = 0; i < n; i++) {
            struct kg_decision d;
            kg_decide(t, s, e[i].index, (int)e[i].is_write, e[i].reason, e[i].data, &d);
            sink += d.value + d.result;
        }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = ((double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec)) / ((double)repeat * (double)n);
    printf("%.3f %llu\n", ns, (unsigned long long)sink);
    return 0;
}
