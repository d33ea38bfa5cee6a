/*
 * cfg_field.h - reading the members of one libconfig group of queues.conf's
 * lists (a schedule, a rate limit), field by field, with the reason and the
 * setting at fault when a member is wrong. Internal to shared/cfg_*.c.
 */
#ifndef CONVEYOR_CFG_FIELD_H
#define CONVEYOR_CFG_FIELD_H

#include "core.h"

#include <libconfig.h>

/* The group being read, and where a refusal puts its setting and reason. */
struct field_reader {
    const config_setting_t *g;
    const config_setting_t **where; /* set to the member at fault (or the group) */
    char *why;                      /* the reason, naming the field (not the file) */
    size_t n;
};

/* Says why (where: member of the group, or the group when NULL or absent) and
 * returns CV_ECONFIG. */
int field_refuse(struct field_reader *r, const char *member, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The string member name into *out (borrowed from the group), NULL when absent;
 * present and not a non-empty string is refused. Returns 0 or CV_ECONFIG. */
int field_string(struct field_reader *r, const char *name, const char **out);
/* A duration member (duration_parse) of at least 1 s into *out; absent keeps
 * *out. Returns 0 or CV_ECONFIG. */
int field_duration(struct field_reader *r, const char *name, int64_t *out);
/* An integer member within [lo, hi] into *out; absent keeps *out. Returns 0 or CV_ECONFIG. */
int field_int(struct field_reader *r, const char *name, long lo, long hi, long *out);
/* True for 1-63 letters, digits, '_', '-' or '.': the name of a list's entry. */
bool field_name_ok(const char *s);

#endif
