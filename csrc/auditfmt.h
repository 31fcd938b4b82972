/* kvmgate audit drain: the consumer side of the per-vCPU audit rings (engine.h), in C.
 *
 * kg_audit_drain() pops records from a ring and does what kvmgate/audit.py's AuditLog.record()
 * and AuditLog.count() do with each, without Python per record: it counts every decision per
 * (MSR, direction, action, result), applies the per-(MSR, direction) token bucket (rate,
 * burst; the suppressed count owed to the next written record), and formats the JSON Lines
 * record of each logged decision the bucket lets through into one output buffer, byte for
 * byte as audit.py's json.dumps() writes it ("schema": 1, the same keys in the same order,
 * `time` = round(record time, 6) printed as Python's repr of a float).  The caller writes the
 * buffer (one write for many records) and reports how many lines went out with
 * kg_audit_commit(); the others count as unlogged and owe their suppressed counts again, as
 * audit.py does for one record whose write fails.
 *
 * Strings that need JSON escaping come pre-escaped from the caller (json.dumps in Python):
 * the rule descriptions of the table that made the records (struct kg_audit_rules) and the MSR
 * names (kg_audit_set_name; a record whose MSR has no name yet stops the drain and reports the
 * index, so names are looked up once per MSR).  `time` of a record is its CLOCK_REALTIME
 * decision time (kg_record.time_ns / 1e9), which is also the bucket's clock.
 *
 * Not on the exit path: this allocates (its tables grow) and is called by one thread at a time
 * per struct kg_audit (the caller serialises), with the ring's single-consumer rule.
 */
#ifndef KVMGATE_AUDITFMT_H
#define KVMGATE_AUDITFMT_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"

/* kg_audit_drain results */
#define KG_AUDIT_EMPTY  0   /* the ring is empty */
#define KG_AUDIT_FULL   1   /* the output buffer reached max_bytes: write it, commit, drain again */
#define KG_AUDIT_NAME   2   /* *missing needs kg_audit_set_name first (nothing popped for it) */
#define KG_AUDIT_NOMEM -1

struct kg_audit;

struct kg_audit_rules {             /* rule ids of one table: pre-escaped JSON strings */
    const char *const *json;        /* json[i], len[i]: the rule's json.dumps(); len 0 or "" */
    const size_t *len;              /*   (the empty rule) means no "rule" key */
    uint32_t n;
};

struct kg_audit_row {               /* decisions counted per (MSR, direction, action, result) */
    uint32_t index;
    uint8_t  flags;                 /* KG_RF_WRITE | KG_RF_WOULD_DENY */
    uint8_t  action;                /* KG_ACT_* */
    uint8_t  result;                /* KG_RES_* */
    uint8_t  reserved;
    uint64_t value;                 /* KG_RES_VALUE: the value read, else 0 */
    uint64_t count;                 /* decisions since the rows were last taken */
    uint64_t unlogged;              /* of them logged decisions whose record was not written */
};

struct kg_audit_owed {              /* a bucket's suppressed count no written record reported */
    uint32_t index;
    uint32_t is_write;
    uint64_t suppressed;
};

struct kg_audit *kg_audit_new(double rate, double burst);
void kg_audit_free(struct kg_audit *a);
void kg_audit_configure(struct kg_audit *a, double rate, double burst);
/* The MSR's name for records, already a JSON string ("\"IA32_...\""); 0 or KG_AUDIT_NOMEM. */
int kg_audit_set_name(struct kg_audit *a, uint32_t index, const char *json, size_t len);
/* Pop and process records until the ring is empty, the buffer holds max_bytes or more, or a
 * logged record's MSR has no name.  KG_AUDIT_* */
int kg_audit_drain(struct kg_audit *a, struct kg_ring *ring, const struct kg_audit_rules *rules,
                   size_t max_bytes, uint32_t *missing);
/* The formatted lines since the last commit. */
const char *kg_audit_buffer(const struct kg_audit *a, size_t *len, uint32_t *lines);
/* The buffer's first `written` lines went out, the others did not; empties it. */
void kg_audit_commit(struct kg_audit *a, size_t written);
/* Rows with counts since the last kg_audit_take_rows (*n of them; valid until the next call
 * into `a`), and the decisions the rate limit suppressed meanwhile; the caller adds them to
 * its counters, then calls kg_audit_clear_rows. */
const struct kg_audit_row *kg_audit_rows(const struct kg_audit *a, size_t *n,
                                         uint64_t *suppressed);
void kg_audit_clear_rows(struct kg_audit *a);
/* Buckets' owed suppressed counts (at most `cap`), which are then no longer owed here: for
 * the caller to write at the end ("suppressed" records).  Returns how many were filled. */
size_t kg_audit_take_owed(struct kg_audit *a, struct kg_audit_owed *out, size_t cap);

/* One decision record's JSON line (no rate limit, no counting): `suppressed_before` 0 leaves
 * the key out, `name`/`rule` pre-escaped (rule_len 0: no "rule" key).  Writes at most `cap`
 * bytes; returns the line's length (as snprintf: more than cap-1 means truncated). */
size_t kg_audit_format(char *out, size_t cap, const struct kg_record *r, const char *name,
                       size_t name_len, const char *rule, size_t rule_len,
                       uint64_t suppressed_before);
/* Python's repr(round(t, 6)) of a float; returns the length (out: at least 32 bytes). */
size_t kg_audit_time(char *out, double t);

#endif
