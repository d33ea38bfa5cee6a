/* json_out.c - small helpers for the JSON Conveyor writes (events, the
 * dashboard's API, conveyor-admin's output). */
#include "core.h"

#include <math.h>

void json_add_optional(cJSON *o, const char *key, const char *value) {
    if (value) cJSON_AddStringToObject(o, key, value);
    else cJSON_AddNullToObject(o, key);
}

void json_add_number_or_null(cJSON *o, const char *key, double v) {
    if (isnan(v) || v < 0) cJSON_AddNullToObject(o, key);
    else cJSON_AddNumberToObject(o, key, v);
}
