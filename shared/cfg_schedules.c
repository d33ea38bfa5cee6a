/* cfg_schedules.c - one schedule of queues.conf's `schedules` list, read and
 * checked field by field (cfg.c walks the list, refuses unknown settings and
 * duplicate names, checks the type's routing and makes the message). */
#include "cfg_field.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* name, and exactly one of cron (with its timezone) and every. */
static int read_when(struct field_reader *r, struct cfg_schedule *s) {
    const char *name, *cron, *every, *zone;
    if (field_string(r, "name", &name) < 0) return CV_ECONFIG;
    if (!name) return field_refuse(r, NULL, "'name' is required");
    if (!field_name_ok(name))
        return field_refuse(r, "name", "'name' must be 1-63 letters, digits, '_', '-' or '.' (got \"%s\")", name);
    snprintf(s->name, sizeof s->name, "%s", name);
    if (field_string(r, "cron", &cron) < 0 || field_string(r, "every", &every) < 0 ||
        field_string(r, "timezone", &zone) < 0)
        return CV_ECONFIG;
    if (cron && every) return field_refuse(r, "every", "'cron' and 'every' are both set: a schedule has one of them");
    if (!cron && !every) return field_refuse(r, NULL, "'cron' or 'every' is required");
    if (every) {
        if (zone)
            return field_refuse(r, "timezone", "'timezone' is for a 'cron' schedule: 'every' counts from the epoch, in UTC");
        s->kind = SCHEDULE_EVERY;
        return field_duration(r, "every", &s->every_s);
    }
    s->kind = SCHEDULE_CRON;
    s->cron_text = xstrdup(cron);
    char why[256];
    if (cron_parse(cron, &s->cron, why, sizeof why) < 0)
        return field_refuse(r, "cron", "'cron' is not a cron expression (\"%s\"): %s", cron, why);
    snprintf(s->timezone, sizeof s->timezone, "%s", zone ? zone : "UTC");
    if (!tz_known(s->timezone))
        return field_refuse(r, "timezone", "'timezone' \"%s\" is not a time zone of the system's tz data "
                                     "(/usr/share/zoneinfo), such as \"Europe/Paris\" or \"UTC\"", zone);
    return 0;
}

/* type, payload, catch_up, catch_up_window. */
static int read_what(struct field_reader *r, struct cfg_schedule *s) {
    const char *type, *payload, *catch_up;
    if (field_string(r, "type", &type) < 0) return CV_ECONFIG;
    if (!type) return field_refuse(r, NULL, "'type' is required: the command type the schedule sends");
    if (strlen(type) >= sizeof s->type) return field_refuse(r, "type", "'type' is longer than %d characters", CFG_NAME_MAX - 1);
    snprintf(s->type, sizeof s->type, "%s", type);
    if (field_string(r, "payload", &payload) < 0) return CV_ECONFIG;
    s->payload = xstrdup(payload ? payload : "{}");
    const char *bad = NULL;
    cJSON *parsed = json_check(s->payload, strlen(s->payload), JSON_MAX_DEPTH, &bad) ? cJSON_Parse(s->payload) : NULL;
    bool object = cJSON_IsObject(parsed);
    cJSON_Delete(parsed);
    if (!object)
        return field_refuse(r, "payload", "'payload' must be a string holding a JSON object, such as \"{\\\"n\\\": 1}\"%s%s",
                      bad ? ": " : " (it holds another JSON value)", bad ? bad : "");
    s->catch_up = CATCH_UP_NONE;
    if (field_string(r, "catch_up", &catch_up) < 0) return CV_ECONFIG;
    if (catch_up && strcmp(catch_up, "none") != 0) {
        if (strcmp(catch_up, "last") == 0) s->catch_up = CATCH_UP_LAST;
        else if (strcmp(catch_up, "all") == 0) s->catch_up = CATCH_UP_ALL;
        else return field_refuse(r, "catch_up", "'catch_up' must be \"none\", \"last\" or \"all\" (got \"%s\")", catch_up);
    }
    s->catch_up_window_s = 60;
    return field_duration(r, "catch_up_window", &s->catch_up_window_s);
}

int cfg_schedule_read(const config_setting_t *g, struct cfg_schedule *s, char *why, size_t n,
                      const config_setting_t **where) {
    memset(s, 0, sizeof *s);
    struct field_reader r = {g, where, why, n};
    if (read_when(&r, s) < 0 || read_what(&r, s) < 0) return CV_ECONFIG;
    return 0;
}

void cfg_schedule_free(struct cfg_schedule *s) {
    if (!s) return;
    free(s->cron_text);
    free(s->payload);
    s->cron_text = s->payload = NULL;
}
