/* log.c - one JSON object per line on stderr. */
#include "core.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *component = "conveyor";
static enum log_level min_level = LOG_INFO;
static const char *const level_names[] = {"debug", "info", "warn", "error"};

void log_init(const char *name) {
    component = name;
    const char *l = getenv("CONVEYOR_LOG_LEVEL");
    if (!l) return;
    for (int i = 0; i < 4; i++)
        if (strcmp(l, level_names[i]) == 0) min_level = (enum log_level)i;
}

const char *log_component(void) { return component; }

/* Writes one line; command_id and trace_id may be NULL (not written). */
__attribute__((format(printf, 4, 0))) static void log_line(enum log_level level, const char *command_id,
                                                          const char *trace_id, const char *fmt, va_list ap) {
    char msg[2048], ts[32];
    vsnprintf(msg, sizeof msg, fmt, ap);
    clock_rfc3339(clock_ms(), ts);

    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "ts", ts);
    cJSON_AddStringToObject(o, "level", level_names[level]);
    cJSON_AddStringToObject(o, "component", component);
    cJSON_AddNumberToObject(o, "pid", (double)getpid());
    if (command_id) cJSON_AddStringToObject(o, "commandId", command_id);
    if (trace_id) cJSON_AddStringToObject(o, "traceId", trace_id);
    cJSON_AddStringToObject(o, "msg", msg);
    char *line = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (line) {
        /* one write per line, so lines of several processes never interleave */
        size_t n = strlen(line);
        line[n] = '\n';
        ssize_t w = write(STDERR_FILENO, line, n + 1);
        (void)w; /* a log line that cannot be written has nowhere else to go */
        free(line);
    }
}

void log_msg(enum log_level level, const char *command_id, const char *fmt, ...) {
    if (level < min_level) return;
    va_list ap;
    va_start(ap, fmt);
    log_line(level, command_id, NULL, fmt, ap);
    va_end(ap);
}

void log_cmd(enum log_level level, const struct envelope *cmd, const char *fmt, ...) {
    if (level < min_level) return;
    va_list ap;
    va_start(ap, fmt);
    log_line(level, cmd ? cmd->id : NULL, cmd && cmd->trace.trace_id[0] ? cmd->trace.trace_id : NULL, fmt, ap);
    va_end(ap);
}
