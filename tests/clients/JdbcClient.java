// Runs queries through the PostgreSQL JDBC driver and prints what it got, in the format every
// client here prints (see tests/e2e/clients.rs and psycopg_client.py).
//
// argv: the JDBC URL, then the queries (SQL, then parameters, separated by U+001F; "int:N" or
// "text:S"; the SQL writes placeholders as the server sees them, $1, and JDBC's ? stand in
// for them here). Every query is a PreparedStatement: the extended protocol. Two names stand for
// the DatabaseMetaData calls that JDBC tools use to browse: "@tables" (getTables of schema
// public) and "@columns:NAME" (getColumns of one table).

import java.sql.*;

public class JdbcClient {
    public static void main(String[] args) throws Exception {
        try (Connection conn = DriverManager.getConnection(args[0])) {
            for (int q = 1; q < args.length; q++) {
                String[] parts = args[q].split("\u001f");
                try {
                    run(conn, parts);
                } catch (SQLException e) {
                    System.out.println("error\t" + e.getSQLState() + "\t" + e.getMessage().replace('\n', ' '));
                }
            }
        }
    }

    static void run(Connection conn, String[] parts) throws SQLException {
        String sql = parts[0];
        DatabaseMetaData meta = conn.getMetaData();
        if (sql.equals("@tables")) {
            try (ResultSet rs = meta.getTables(null, "public", "%", null)) {
                print(rs, new String[] {"TABLE_NAME", "TABLE_TYPE"});
            }
        } else if (sql.startsWith("@columns:")) {
            try (ResultSet rs = meta.getColumns(null, "public", sql.substring(9), "%")) {
                print(rs, new String[] {"COLUMN_NAME", "TYPE_NAME", "DATA_TYPE", "NULLABLE"});
            }
        } else {
            java.util.List<String> bound = new java.util.ArrayList<>();
            java.util.regex.Matcher m = java.util.regex.Pattern.compile("\\$(\\d+)").matcher(sql);
            StringBuilder jdbc = new StringBuilder();
            while (m.find()) {
                bound.add(parts[Integer.parseInt(m.group(1))]);
                m.appendReplacement(jdbc, "?");
            }
            m.appendTail(jdbc);
            try (PreparedStatement ps = conn.prepareStatement(jdbc.toString())) {
                for (int i = 0; i < bound.size(); i++) {
                    String p = bound.get(i);
                    String value = p.substring(p.indexOf(':') + 1);
                    if (p.startsWith("int:")) ps.setLong(i + 1, Long.parseLong(value));
                    else ps.setString(i + 1, value);
                }
                try (ResultSet rs = ps.executeQuery()) {
                    print(rs, null);
                }
            }
        }
    }

    /** Prints the result set, or only the named columns of it. */
    static void print(ResultSet rs, String[] only) throws SQLException {
        ResultSetMetaData md = rs.getMetaData();
        int n = only == null ? md.getColumnCount() : only.length;
        StringBuilder rows = new StringBuilder();
        String[] natives = new String[n];
        while (rs.next()) {
            rows.append("row");
            for (int i = 0; i < n; i++) {
                Object v = only == null ? rs.getObject(i + 1) : rs.getObject(only[i]);
                if (natives[i] == null && v != null) natives[i] = v.getClass().getSimpleName();
                rows.append('\t').append(render(v));
            }
            rows.append('\n');
        }
        StringBuilder columns = new StringBuilder("columns");
        for (int i = 0; i < n; i++) {
            String name = only == null ? md.getColumnLabel(i + 1) : only[i];
            String type = only == null ? md.getColumnTypeName(i + 1) : md.getColumnTypeName(rs.findColumn(only[i]));
            columns.append('\t').append(name).append(':').append(type).append(':')
                .append(natives[i] == null ? "-" : natives[i]);
        }
        System.out.println(columns);
        System.out.print(rows);
        System.out.println("end");
    }

    static String render(Object v) {
        if (v == null) return "NULL";
        // Milliseconds since the epoch (the JVM runs with user.timezone=UTC).
        if (v instanceof Timestamp) return Long.toString(((Timestamp) v).getTime());
        return v.toString();
    }
}
