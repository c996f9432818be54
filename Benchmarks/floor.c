/* The floor under any executor fed by Celery's client: take the message off kombu's Redis list (BRPOP, as a Celery
 * worker does), posix_spawn the no-op `airflow`, wait for it — and nothing else: no dispatcher hop, no lease, no
 * result, no ack, no parsing. Whatever an executor adds (Tandem's or Celery's) comes on top of this, so a target
 * below this floor cannot be met by any executor on this machine and publish path.
 *
 *   floor HOST PORT LIST BINARY --times N     one consumer: after each of N messages, prints the wall-clock time
 *                                             (CLOCK_REALTIME, "sec.nsec") at which its process had been reaped
 *   floor HOST PORT LIST BINARY --rate T      T consumers, each on its own connection, until LIST is empty
 *                                             (preloaded); prints messages per second
 *   floor HOST PORT LIST BINARY --safe T PG   the same, doing the least an executor that loses nothing must: each
 *                                             consumer takes a message with LMOVE into its own processing list (a
 *                                             worker killed mid-task leaves it there, as kombu's visibility does),
 *                                             and one writer thread commits every result waiting (one multi-row
 *                                             INSERT per commit: group commit, synchronous_commit on) and only then
 *                                             acks them (LREM, pipelined). PG is a libpq connection string.
 *
 * Built by Benchmarks/run (gcc -O2 floor.c -lhiredis -lpq -pthread). */
#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
extern char **environ;

static const char *host, *list, *bin;
static int port;
static long done_total;
static pthread_mutex_t count_lock = PTHREAD_MUTEX_INITIALIZER;

static redisContext *connect_or_die(void) {
    redisContext *c = redisConnect(host, port);
    if (c == NULL || c->err) {
        fprintf(stderr, "floor: cannot connect to Redis at %s:%d: %s — is it running?\n", host, port,
                c ? c->errstr : "out of memory");
        exit(1);
    }
    return c;
}

/* Runs the no-op as a task would be run; exits the program if it does not exit 0. */
static void run_task(void) {
    char *argv[] = {(char *)bin, "tasks", "run", "dag", "task", "run_id", NULL};
    pid_t pid;
    int st;
    if (posix_spawn(&pid, bin, NULL, NULL, argv, environ) != 0) { perror("floor: posix_spawn"); exit(1); }
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "floor: %s did not exit 0\n", bin);
        exit(1);
    }
}

static void *drain(void *arg) {
    (void)arg;
    redisContext *c = connect_or_die();
    long mine = 0;
    for (;;) {
        redisReply *r = redisCommand(c, "RPOP %s", list);
        if (r == NULL) { fprintf(stderr, "floor: Redis connection lost: %s\n", c->errstr); exit(1); }
        int empty = r->type == REDIS_REPLY_NIL;
        freeReplyObject(r);
        if (empty) break;
        run_task();
        mine++;
    }
    pthread_mutex_lock(&count_lock);
    done_total += mine;
    pthread_mutex_unlock(&count_lock);
    redisFree(c);
    return NULL;
}

/* --safe: results waiting for the writer. */
struct done_msg { char *body; size_t len; int consumer; long seq; };
static struct done_msg *pending;
static size_t pending_n, pending_cap;
static int consumers_left;
static pthread_cond_t pending_cond = PTHREAD_COND_INITIALIZER;
static const char *pg_conninfo;

static void *safe_consume(void *arg) {
    int me = (int)(long)arg;
    redisContext *c = connect_or_die();
    char processing[64];
    snprintf(processing, sizeof processing, "floor:processing:%d", me);
    for (long seq = 0;; seq++) {
        redisReply *r = redisCommand(c, "LMOVE %s %s RIGHT LEFT", list, processing);
        if (r == NULL) { fprintf(stderr, "floor: Redis connection lost: %s\n", c->errstr); exit(1); }
        if (r->type != REDIS_REPLY_STRING) { freeReplyObject(r); break; }
        struct done_msg m = {malloc(r->len), r->len, me, seq};
        memcpy(m.body, r->str, r->len);
        freeReplyObject(r);
        run_task();
        pthread_mutex_lock(&count_lock);
        if (pending_n == pending_cap) {
            pending_cap = pending_cap ? pending_cap * 2 : 64;
            pending = realloc(pending, pending_cap * sizeof *pending);
        }
        pending[pending_n++] = m;
        pthread_cond_signal(&pending_cond);
        pthread_mutex_unlock(&count_lock);
    }
    pthread_mutex_lock(&count_lock);
    consumers_left--;
    pthread_cond_signal(&pending_cond);
    pthread_mutex_unlock(&count_lock);
    redisFree(c);
    return NULL;
}

static void pg_or_die(PGconn *pg, PGresult *res, const char *what) {
    if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "floor: %s failed: %s", what, PQerrorMessage(pg));
        exit(1);
    }
    PQclear(res);
}

/* Commits every waiting result in one transaction, then acks them; until the consumers are done and none wait. */
static void *safe_write(void *arg) {
    (void)arg;
    PGconn *pg = PQconnectdb(pg_conninfo);
    if (PQstatus(pg) != CONNECTION_OK) { fprintf(stderr, "floor: cannot connect to Postgres: %s", PQerrorMessage(pg)); exit(1); }
    redisContext *c = connect_or_die();
    size_t sql_cap = 1 << 16;
    char *sql = malloc(sql_cap);
    for (;;) {
        pthread_mutex_lock(&count_lock);
        while (pending_n == 0 && consumers_left > 0) pthread_cond_wait(&pending_cond, &count_lock);
        if (pending_n == 0) { pthread_mutex_unlock(&count_lock); break; }
        struct done_msg *batch = pending;
        size_t n = pending_n;
        pending = NULL;
        pending_n = pending_cap = 0;
        pthread_mutex_unlock(&count_lock);
        if (sql_cap < 128 + n * 64) { sql_cap = 128 + n * 64; sql = realloc(sql, sql_cap); }
        size_t off = (size_t)snprintf(sql, sql_cap, "INSERT INTO floor_results (task_id, status, date_done) VALUES ");
        for (size_t i = 0; i < n; i++)
            off += (size_t)snprintf(sql + off, sql_cap - off, "%s('t%d-%ld', 'SUCCESS', now())", i ? "," : "",
                                    batch[i].consumer, batch[i].seq);
        pg_or_die(pg, PQexec(pg, sql), "INSERT of results");  /* one statement: its own transaction, one commit */
        for (size_t i = 0; i < n; i++) {
            char processing[64];
            snprintf(processing, sizeof processing, "floor:processing:%d", batch[i].consumer);
            redisAppendCommand(c, "LREM %s 1 %b", processing, batch[i].body, batch[i].len);
        }
        for (size_t i = 0; i < n; i++) {
            redisReply *r;
            if (redisGetReply(c, (void **)&r) != REDIS_OK) { fprintf(stderr, "floor: ack failed: %s\n", c->errstr); exit(1); }
            if (r->type != REDIS_REPLY_INTEGER || r->integer != 1) { fprintf(stderr, "floor: ack removed nothing\n"); exit(1); }
            freeReplyObject(r);
            free(batch[i].body);
        }
        free(batch);
        done_total += (long)n;  /* only this thread writes it while consumers run */
    }
    PQfinish(pg);
    redisFree(c);
    return NULL;
}

static int run_safe(int threads) {
    PGconn *pg = PQconnectdb(pg_conninfo);
    if (PQstatus(pg) != CONNECTION_OK) { fprintf(stderr, "floor: cannot connect to Postgres: %s", PQerrorMessage(pg)); return 1; }
    pg_or_die(pg, PQexec(pg, "CREATE TABLE IF NOT EXISTS floor_results (id BIGSERIAL PRIMARY KEY, "
                             "task_id TEXT UNIQUE, status TEXT, date_done TIMESTAMP)"), "CREATE TABLE");
    pg_or_die(pg, PQexec(pg, "TRUNCATE floor_results"), "TRUNCATE");
    PQfinish(pg);
    pthread_t th[64], writer;
    struct timespec a, b;
    consumers_left = threads;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pthread_create(&writer, NULL, safe_write, NULL);
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, safe_consume, (void *)(long)i);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    pthread_join(writer, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.1f %ld\n", done_total / s, done_total);
    return 0;
}

int main(int argc, char **argv) {
    int safe = argc == 8 && strcmp(argv[5], "--safe") == 0;
    if (!safe && (argc != 7 || (strcmp(argv[5], "--times") != 0 && strcmp(argv[5], "--rate") != 0))) {
        fprintf(stderr, "usage: floor HOST PORT LIST BINARY --times N | --rate THREADS | --safe THREADS PGCONNINFO\n");
        return 2;
    }
    host = argv[1];
    port = atoi(argv[2]);
    list = argv[3];
    bin = argv[4];
    long n = atol(argv[6]);
    if (strcmp(argv[5], "--times") == 0) {
        redisContext *c = connect_or_die();
        setvbuf(stdout, NULL, _IOLBF, 0);
        for (long i = 0; i < n; i++) {
            redisReply *r = redisCommand(c, "BRPOP %s 30", list);
            if (r == NULL) { fprintf(stderr, "floor: Redis connection lost: %s\n", c->errstr); return 1; }
            if (r->type != REDIS_REPLY_ARRAY) {
                fprintf(stderr, "floor: no message on %s for 30 s after %ld of %ld\n", list, i, n);
                return 1;
            }
            freeReplyObject(r);
            run_task();
            struct timespec t;
            clock_gettime(CLOCK_REALTIME, &t);
            printf("%ld.%09ld\n", (long)t.tv_sec, t.tv_nsec);
        }
        redisFree(c);
        return 0;
    }
    int threads = (int)n;
    if (threads < 1 || threads > 64) { fprintf(stderr, "floor: THREADS must be 1..64\n"); return 2; }
    if (safe) {
        pg_conninfo = argv[7];
        return run_safe(threads);
    }
    pthread_t th[64];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, drain, NULL);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.1f %ld\n", done_total / s, done_total);
    return 0;
}
