"""Runs queries through psycopg 3 and prints what it got, in the format every client here
prints (see tests/e2e/clients.rs):

    columns <TAB> name:pg_type:python_type ...
    row <TAB> value ...
    end                                     (or: error <TAB> SQLSTATE <TAB> message)

argv: conninfo, protocol ("simple": queries without parameters go as simple queries, as
psycopg sends them; "extended": every query is prepared), then the queries. A query is its
SQL, then its parameters, separated by U+001F; a parameter is "int:N" or "text:S". The SQL
writes placeholders as the server sees them ($1, $2); psycopg spells them %s and binds them
on the server.
"""

import calendar
import datetime
import re
import sys

import psycopg


def param(p):
    kind, value = p.split(":", 1)
    return int(value) if kind == "int" else value


def placeholders(sql, params):
    """The SQL with psycopg's %s for each $N, and the parameters in the order they appear."""
    order = []

    def to_psycopg(m):
        order.append(params[int(m.group(1)) - 1])
        return "%s"

    return re.sub(r"\$(\d+)", to_psycopg, sql.replace("%", "%%")), order


def render(v):
    if v is None:
        return "NULL"
    if isinstance(v, datetime.datetime):
        # Milliseconds since the epoch, as every client can print them.
        return str(calendar.timegm(v.utctimetuple()) * 1000 + v.microsecond // 1000)
    return repr(v) if isinstance(v, float) else str(v)


def main():
    conninfo, protocol, queries = sys.argv[1], sys.argv[2], sys.argv[3:]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for query in queries:
            sql, *params = query.split("\x1f")
            sql, params = placeholders(sql, [param(p) for p in params])
            try:
                cur = conn.execute(sql, params or None, prepare=protocol == "extended")
                rows = cur.fetchall()
            except psycopg.Error as e:
                print("error", e.sqlstate, str(e).replace("\n", " "), sep="\t")
                continue
            columns = []
            for i, d in enumerate(cur.description):
                info = conn.adapters.types.get(d.type_code)
                native = type(rows[0][i]).__name__ if rows and rows[0][i] is not None else "-"
                columns.append(f"{d.name}:{info.name if info else d.type_code}:{native}")
            print("columns", *columns, sep="\t")
            for row in rows:
                print("row", *(render(v) for v in row), sep="\t")
            print("end")


main()
