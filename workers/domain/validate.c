/* validate.c - payload rules (docs/contract.md, "Commands"), collecting every broken one. */
#include "domain.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void verr_add(struct verr *v, const char *field, const char *reason) {
    char name[160];
    snprintf(name, sizeof name, "%s%s", v->prefix ? v->prefix : "", field);
    if (!v->fields) v->fields = cJSON_CreateObject();
    if (!cJSON_GetObjectItemCaseSensitive(v->fields, name)) cJSON_AddStringToObject(v->fields, name, reason);
}

bool verr_any(const struct verr *v) { return v->fields != NULL; }

void verr_free(struct verr *v) {
    cJSON_Delete(v->fields);
    v->fields = NULL;
}

/* The member, or NULL when absent or null (records "is required" if required). */
static const cJSON *member(struct verr *v, const cJSON *obj, const char *field, bool required) {
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(obj, field);
    if (m && !cJSON_IsNull(m)) return m;
    if (required) verr_add(v, field, "is required");
    return NULL;
}

enum v_result v_string(struct verr *v, const cJSON *obj, const char *field, bool required, bool trim,
             size_t min_chars, size_t max_chars, char **out) {
    *out = NULL;
    const cJSON *m = member(v, obj, field, required);
    if (!m) return V_ABSENT;
    if (!cJSON_IsString(m)) { verr_add(v, field, "must be a string"); return V_INVALID; }
    const char *s = m->valuestring, *e = s + strlen(s);
    if (trim) {
        while (s < e && isspace((unsigned char)*s)) s++;
        while (e > s && isspace((unsigned char)e[-1])) e--;
    }
    char *copy = xstrndup(s, (size_t)(e - s));
    size_t n = utf8_chars(copy);
    if (n < min_chars || n > max_chars) {
        char reason[96];
        if (min_chars > 0 && trim) snprintf(reason, sizeof reason, "must be %zu-%zu characters once trimmed", min_chars, max_chars);
        else if (min_chars > 0) snprintf(reason, sizeof reason, "must be %zu-%zu characters", min_chars, max_chars);
        else snprintf(reason, sizeof reason, "must be at most %zu characters", max_chars);
        verr_add(v, field, reason);
        free(copy);
        return V_INVALID;
    }
    *out = copy;
    return V_VALID;
}

enum v_result v_uuid(struct verr *v, const cJSON *obj, const char *field, bool required, char out[ID_LEN + 1]) {
    out[0] = '\0';
    const cJSON *m = member(v, obj, field, required);
    if (!m) return V_ABSENT;
    if (!cJSON_IsString(m) || !id_parse(m->valuestring, out)) {
        out[0] = '\0';
        verr_add(v, field, "must be a UUID string");
        return V_INVALID;
    }
    return V_VALID;
}

enum v_result v_int(struct verr *v, const cJSON *obj, const char *field, bool required, long long min,
          long long max, long long *out) {
    const cJSON *m = member(v, obj, field, required);
    if (!m) return V_ABSENT;
    double d = m->valuedouble;
    if (!cJSON_IsNumber(m) || !isfinite(d) || floor(d) != d) {
        verr_add(v, field, "must be an integer");
        return V_INVALID;
    }
    if (d < (double)min || d > (double)max) {
        char reason[96];
        snprintf(reason, sizeof reason, "must be between %lld and %lld", min, max);
        verr_add(v, field, reason);
        return V_INVALID;
    }
    *out = (long long)d;
    return V_VALID;
}

#define PRICE_MAX_CENTS 9999999999LL /* 99999999.99 */

enum v_result v_price(struct verr *v, const cJSON *obj, const char *field, bool required, char out[32]) {
    out[0] = '\0';
    const cJSON *m = member(v, obj, field, required);
    if (!m) return V_ABSENT;
    long long cents;
    if (cJSON_IsNumber(m)) {
        double d = m->valuedouble;
        if (!isfinite(d) || d < 0 || d > 99999999.99 + 1e-9) {
            verr_add(v, field, "must be between 0 and 99999999.99");
            return V_INVALID;
        }
        double c = d * 100.0;
        cents = llround(c);
        if (fabs(c - (double)cents) > 1e-6 * (c > 1 ? c : 1)) {
            verr_add(v, field, "must have at most 2 decimals");
            return V_INVALID;
        }
    } else if (cJSON_IsString(m)) {
        /* digits[.d[d]], nothing else */
        const char *s = m->valuestring;
        size_t i = 0, ni = 0, nf = 0;
        while (isdigit((unsigned char)s[i])) i++, ni++;
        if (s[i] == '.') {
            i++;
            while (isdigit((unsigned char)s[i])) i++, nf++;
            if (nf == 0) ni = 0; /* "12." is malformed */
        }
        if (ni == 0 || s[i] != '\0') {
            verr_add(v, field, s[0] == '-' ? "must be between 0 and 99999999.99"
                                           : "must be a number or a decimal string such as \"19.99\"");
            return V_INVALID;
        }
        if (nf > 2) { verr_add(v, field, "must have at most 2 decimals"); return V_INVALID; }
        const char *p = s;
        while (*p == '0' && isdigit((unsigned char)p[1])) p++; /* leading zeros */
        size_t digits = (size_t)(strchr(p, '.') ? strchr(p, '.') - p : (ptrdiff_t)strlen(p));
        if (digits > 8) { verr_add(v, field, "must be between 0 and 99999999.99"); return V_INVALID; }
        cents = atoll(p) * 100;
        const char *dot = strchr(p, '.');
        if (dot && nf >= 1) cents += (dot[1] - '0') * 10 + (nf == 2 ? dot[2] - '0' : 0);
    } else {
        verr_add(v, field, "must be a number or a decimal string such as \"19.99\"");
        return V_INVALID;
    }
    if (cents < 0 || cents > PRICE_MAX_CENTS) {
        verr_add(v, field, "must be between 0 and 99999999.99");
        return V_INVALID;
    }
    snprintf(out, 32, "%lld.%02lld", cents / 100, cents % 100);
    return V_VALID;
}

enum v_result v_email(struct verr *v, const cJSON *obj, const char *field, bool required, char **out) {
    enum v_result rc = v_string(v, obj, field, required, true, 1, 254, out);
    if (rc != V_VALID) return rc;
    char *s = *out;
    const char *at = strchr(s, '@');
    bool ok = at && at != s && !strchr(at + 1, '@');
    for (const char *p = s; ok && *p; p++)
        if (isspace((unsigned char)*p) || iscntrl((unsigned char)*p)) ok = false;
    if (ok) {
        const char *dom = at + 1, *dot = strchr(dom, '.');
        size_t dl = strlen(dom);
        ok = dl >= 3 && dot && dot != dom && dom[dl - 1] != '.' && !strstr(dom, "..");
    }
    if (!ok) {
        verr_add(v, field, "must be a valid email address (one '@', a local part, a domain with a dot)");
        free(s);
        *out = NULL;
        return V_INVALID;
    }
    return V_VALID; /* lower-cased where it is stored (handler_register.c), with the database's mapping */
}

enum v_result v_password(struct verr *v, const cJSON *obj, const char *field, bool required, const char **out) {
    *out = NULL;
    const cJSON *m = member(v, obj, field, required);
    if (!m) return V_ABSENT;
    if (!cJSON_IsString(m)) { verr_add(v, field, "must be a string"); return V_INVALID; }
    const char *s = m->valuestring;
    size_t n = strlen(s);
    bool up = false, low = false, dig = false;
    for (const char *p = s; *p; p++) {
        up |= (*p >= 'A' && *p <= 'Z');
        low |= (*p >= 'a' && *p <= 'z');
        dig |= (*p >= '0' && *p <= '9');
    }
    if (n < 8 || n > 128) { verr_add(v, field, "must be 8-128 bytes"); return V_INVALID; }
    if (!up || !low || !dig) {
        verr_add(v, field, "must contain an upper-case letter, a lower-case letter and a digit");
        return V_INVALID;
    }
    *out = s;
    return V_VALID;
}
