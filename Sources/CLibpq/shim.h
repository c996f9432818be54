#ifndef TANDEM_CLIBPQ_SHIM_H
#define TANDEM_CLIBPQ_SHIM_H
#include <libpq-fe.h>

/* PG_DIAG_* are character-literal macros Swift does not import. */
static const int tandem_pg_diag_sqlstate = PG_DIAG_SQLSTATE;
static const int tandem_pg_diag_message_primary = PG_DIAG_MESSAGE_PRIMARY;
static const int tandem_pg_diag_message_detail = PG_DIAG_MESSAGE_DETAIL;

#endif
