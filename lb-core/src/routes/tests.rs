use super::*;

fn route(name: &str) -> Route {
    Route {
        upstream: Arc::new(Upstream {
            name: name.to_owned(),
            target: Target::Endpoints(Vec::new()),
            protocol: UpstreamProtocol::Http1,
            tls: None,
        }),
        ingress: ObjectKey::new("test", name),
        ssl_redirect: false,
        balance: Balance::RoundRobin,
        max_body_bytes: None,
        policy: Arc::default(),
    }
}

fn path(kind: PathKind, path: &str, to: &str) -> PathRule {
    PathRule {
        path: path.to_owned(),
        kind,
        route: route(to),
    }
}

fn prefix(p: &str, to: &str) -> PathRule {
    path(PathKind::Prefix, p, to)
}

fn exact(p: &str, to: &str) -> PathRule {
    path(PathKind::Exact, p, to)
}

fn any_host(paths: Vec<PathRule>) -> RouteTable {
    RouteTable::new(
        vec![HostRule {
            host: HostPattern::Any,
            paths,
        }],
        None,
    )
}

fn target<'a>(table: &'a RouteTable, host: &str, path: &str) -> Option<&'a str> {
    table.lookup(host, path).map(|r| r.upstream.name.as_str())
}

/// Rule paths, request path, the rule that should match.
type Row<'a> = (&'a [(PathKind, &'a str)], &'a str, Option<&'a str>);

/// Every row of the table under "Examples" in
/// <https://kubernetes.io/docs/concepts/services-networking/ingress/#examples>
/// (path types, paths in the rule, request path, match).
#[test]
fn kubernetes_docs_path_matching_table() {
    use PathKind::{Exact, Prefix};
    #[rustfmt::skip]
    let rows: &[Row] = &[
        // Prefix  /  (all paths)  Yes
        (&[(Prefix, "/")], "/", Some("/")),
        (&[(Prefix, "/")], "/anything/at/all", Some("/")),
        // Exact  /foo  /foo  Yes
        (&[(Exact, "/foo")], "/foo", Some("/foo")),
        // Exact  /foo  /bar  No
        (&[(Exact, "/foo")], "/bar", None),
        // Exact  /foo  /foo/  No
        (&[(Exact, "/foo")], "/foo/", None),
        // Exact  /foo/  /foo  No
        (&[(Exact, "/foo/")], "/foo", None),
        // Prefix  /foo  /foo, /foo/  Yes
        (&[(Prefix, "/foo")], "/foo", Some("/foo")),
        (&[(Prefix, "/foo")], "/foo/", Some("/foo")),
        // Prefix  /foo/  /foo, /foo/  Yes
        (&[(Prefix, "/foo/")], "/foo", Some("/foo/")),
        (&[(Prefix, "/foo/")], "/foo/", Some("/foo/")),
        // Prefix  /aaa/bb  /aaa/bbb  No
        (&[(Prefix, "/aaa/bb")], "/aaa/bbb", None),
        // Prefix  /aaa/bbb  /aaa/bbb  Yes
        (&[(Prefix, "/aaa/bbb")], "/aaa/bbb", Some("/aaa/bbb")),
        // Prefix  /aaa/bbb/  /aaa/bbb  Yes, ignores trailing slash
        (&[(Prefix, "/aaa/bbb/")], "/aaa/bbb", Some("/aaa/bbb/")),
        // Prefix  /aaa/bbb  /aaa/bbb/  Yes, matches trailing slash
        (&[(Prefix, "/aaa/bbb")], "/aaa/bbb/", Some("/aaa/bbb")),
        // Prefix  /aaa/bbb  /aaa/bbb/ccc  Yes, matches subpath
        (&[(Prefix, "/aaa/bbb")], "/aaa/bbb/ccc", Some("/aaa/bbb")),
        // Prefix  /aaa/bbb  /aaa/bbbxyz  No, does not match string prefix
        (&[(Prefix, "/aaa/bbb")], "/aaa/bbbxyz", None),
        // Prefix  /, /aaa  /aaa/ccc  Yes, matches /aaa prefix
        (&[(Prefix, "/"), (Prefix, "/aaa")], "/aaa/ccc", Some("/aaa")),
        // Prefix  /, /aaa, /aaa/bbb  /aaa/bbb  Yes, matches /aaa/bbb prefix
        (&[(Prefix, "/"), (Prefix, "/aaa"), (Prefix, "/aaa/bbb")], "/aaa/bbb", Some("/aaa/bbb")),
        // Prefix  /, /aaa, /aaa/bbb  /ccc  Yes, matches / prefix
        (&[(Prefix, "/"), (Prefix, "/aaa"), (Prefix, "/aaa/bbb")], "/ccc", Some("/")),
        // Prefix  /aaa  /ccc  No, uses default backend
        (&[(Prefix, "/aaa")], "/ccc", None),
        // Mixed  /foo (Prefix), /foo (Exact)  /foo  Yes, prefers Exact
        (&[(Prefix, "/foo"), (Exact, "/foo")], "/foo", Some("Exact /foo")),
        (&[(Exact, "/foo"), (Prefix, "/foo")], "/foo", Some("Exact /foo")),
    ];
    for (paths, request, want) in rows {
        let rules = paths
            .iter()
            .map(|(kind, p)| {
                let name = match kind {
                    PathKind::Exact if paths.len() > 1 => format!("Exact {p}"),
                    _ => (*p).to_owned(),
                };
                path(*kind, p, &name)
            })
            .collect();
        let table = any_host(rules);
        assert_eq!(
            target(&table, "example.com", request),
            *want,
            "rules {paths:?}, request {request}"
        );
        // "No" rows use the default backend when there is one.
        let with_default = RouteTable::new(table.rules().to_vec(), Some(route("default")));
        assert_eq!(
            target(&with_default, "example.com", request),
            Some(want.unwrap_or("default")),
            "rules {paths:?}, request {request}, with a default backend"
        );
    }
}

#[test]
fn longest_prefix_wins_whatever_the_order_and_query_is_ignored() {
    let table = any_host(vec![
        prefix("/a/b/c", "abc"),
        prefix("/a", "a"),
        prefix("/a/b", "ab"),
        exact("/a/b/c/d", "exact"),
    ]);
    assert_eq!(target(&table, "h", "/a/b/c/d"), Some("exact"));
    assert_eq!(target(&table, "h", "/a/b/c/d?x=1"), Some("exact"));
    assert_eq!(target(&table, "h", "/a/b/c/d/"), Some("abc"));
    assert_eq!(target(&table, "h", "/a/b/x?q=/a/b/c"), Some("ab"));
    assert_eq!(target(&table, "h", "/a/bc"), Some("a"));
    assert_eq!(target(&table, "h", "/ab"), None);
    // Paths are case sensitive.
    assert_eq!(target(&table, "h", "/A"), None);
}

fn hosts() -> RouteTable {
    let host = |pattern: HostPattern, to: &str| HostRule {
        host: pattern,
        paths: vec![prefix("/", to)],
    };
    RouteTable::new(
        vec![
            host(HostPattern::Exact("foo.example.com".into()), "exact"),
            host(HostPattern::Wildcard(".example.com".into()), "wildcard"),
            host(HostPattern::Exact("[2001:db8::1]".into()), "v6"),
            HostRule {
                host: HostPattern::Exact("api.example.com".into()),
                paths: vec![prefix("/v1", "api-v1")],
            },
            host(HostPattern::Any, "any"),
        ],
        Some(route("default")),
    )
}

#[test]
fn host_rules_exact_wildcard_and_any() {
    let table = hosts();
    for (host, want) in [
        ("foo.example.com", "exact"),
        ("FOO.Example.COM", "exact"),
        ("foo.example.com:8080", "exact"),
        ("foo.example.com.", "exact"),
        ("bar.example.com", "wildcard"),
        ("Bar.EXAMPLE.com:443", "wildcard"),
        // One label only.
        ("a.b.example.com", "any"),
        ("example.com", "any"),
        (".example.com", "any"),
        ("other.org", "any"),
        ("[2001:db8::1]:443", "v6"),
        ("", "any"),
    ] {
        assert_eq!(target(&table, host, "/x"), Some(want), "host {host:?}");
    }
    let long = format!("{}.example.com", "a".repeat(300));
    assert_eq!(target(&table, &long, "/x"), Some("any"));
}

#[test]
fn a_host_without_a_matching_path_uses_the_default_backend_not_host_less_rules() {
    let table = hosts();
    assert_eq!(target(&table, "api.example.com", "/v1/x"), Some("api-v1"));
    // api.example.com exists as an exact host: neither the wildcard nor the host-less
    // rules answer for it.
    assert_eq!(target(&table, "api.example.com", "/v2"), Some("default"));
    let without_default = RouteTable::new(hosts().rules().to_vec(), None);
    assert_eq!(target(&without_default, "api.example.com", "/v2"), None);
    assert_eq!(target(&without_default, "nothing.org", "/v2"), Some("any"));
}

#[test]
fn no_rules_and_no_default_is_404() {
    let table = RouteTable::new(Vec::new(), None);
    assert_eq!(target(&table, "example.com", "/"), None);
    let table = RouteTable::new(Vec::new(), Some(route("default")));
    assert_eq!(target(&table, "example.com", "/"), Some("default"));
}

#[test]
fn same_host_in_several_rules_is_one_group_first_duplicate_wins() {
    let table = RouteTable::new(
        vec![
            HostRule {
                host: HostPattern::Exact("a.example.com".into()),
                paths: vec![prefix("/x", "first"), prefix("/y/", "y")],
            },
            HostRule {
                host: HostPattern::Exact("a.example.com".into()),
                paths: vec![
                    prefix("/x", "second"),
                    prefix("/x/", "slashed"),
                    exact("/z", "z"),
                ],
            },
        ],
        None,
    );
    assert_eq!(target(&table, "a.example.com", "/x"), Some("first"));
    // `/x/` is a route of its own, not a duplicate of `/x`.
    assert_eq!(target(&table, "a.example.com", "/x/1"), Some("slashed"));
    assert_eq!(target(&table, "a.example.com", "/y"), Some("y"));
    assert_eq!(target(&table, "a.example.com", "/z"), Some("z"));
}

/// `/foo` and `/foo/` (both Prefix) are two routes. Kubernetes has both match the
/// same requests and the longest matching path win: `/foo/` is the longer one for
/// every request that literally starts with it (`/foo/` and below), and `/foo` is the
/// one a request for `/foo` itself literally matches (nginx's longest-prefix location
/// choice gives the same answer). Exact still beats both.
#[test]
fn prefixes_differing_by_a_trailing_slash_are_two_routes() {
    for order in [false, true] {
        let mut paths = vec![prefix("/foo", "bare"), prefix("/foo/", "slashed")];
        if order {
            paths.reverse();
        }
        let table = any_host(paths);
        assert_eq!(target(&table, "h", "/foo"), Some("bare"));
        assert_eq!(target(&table, "h", "/foo?q=/"), Some("bare"));
        assert_eq!(target(&table, "h", "/foo/"), Some("slashed"));
        assert_eq!(target(&table, "h", "/foo/bar"), Some("slashed"));
        assert_eq!(target(&table, "h", "/foo/bar/baz"), Some("slashed"));
        assert_eq!(target(&table, "h", "/foobar"), None);
    }
    // Alone, each matches both forms, as the Kubernetes table says.
    for (alone, name) in [("/foo", "bare"), ("/foo/", "slashed")] {
        let table = any_host(vec![prefix(alone, name)]);
        assert_eq!(target(&table, "h", "/foo"), Some(name));
        assert_eq!(target(&table, "h", "/foo/x"), Some(name));
    }
    // A longer prefix still beats both, and Exact beats a Prefix of equal length.
    let table = any_host(vec![
        prefix("/foo", "bare"),
        prefix("/foo/", "slashed"),
        prefix("/foo/bar", "bar"),
        exact("/foo/", "exact"),
    ]);
    assert_eq!(target(&table, "h", "/foo/bar/x"), Some("bar"));
    assert_eq!(target(&table, "h", "/foo/"), Some("exact"));
    assert_eq!(target(&table, "h", "/foo/baz"), Some("slashed"));
    assert_eq!(target(&table, "h", "/foo"), Some("bare"));
}

fn regex(p: &str, to: &str) -> PathRule {
    path(PathKind::Regex, p, to)
}

/// ingress-nginx's "Ingress Path Matching" example: with `use-regex`, locations are
/// tried longest path first and case-insensitively, so `/foo/bar/bar` is answered by
/// `/foo/bar/[A-Z0-9]{3}`; `/foo/bar/.+` is tried before `/foo/bar/` and `/foo/bar`.
#[test]
fn regex_paths_are_tried_in_ingress_nginx_order() {
    let table = any_host(vec![
        regex("/foo/bar/bar", "bar"),
        regex("/foo/bar/[A-Z0-9]{3}", "class"),
    ]);
    assert_eq!(target(&table, "h", "/foo/bar/bar"), Some("class"));
    assert_eq!(target(&table, "h", "/FOO/bar/BAZ"), Some("class"));
    assert_eq!(target(&table, "h", "/foo/bar/b"), None);
    let table = any_host(vec![
        regex("/foo/bar", "bare"),
        regex("/foo/bar/", "slashed"),
        regex("/foo/bar/.+", "deeper"),
    ]);
    assert_eq!(target(&table, "h", "/foo/bar/bar"), Some("deeper"));
    assert_eq!(target(&table, "h", "/foo/bar/"), Some("slashed"));
    assert_eq!(target(&table, "h", "/foo/bar"), Some("bare"));
    // Anchored at the start only: a regex path is a prefix of sorts.
    assert_eq!(target(&table, "h", "/foo/barbaz"), Some("bare"));
    assert_eq!(target(&table, "h", "/x/foo/bar"), None);
}

/// ingress-nginx's rewrite example: `path: /something(/|$)(.*)` with
/// `rewrite-target: /$2`.
#[test]
fn rewrite_target_with_capture_groups() {
    let rewrite = Rewrite {
        pattern: PathRegex::new("/something(/|$)(.*)", false).unwrap(),
        target: "/$2".into(),
    };
    assert_eq!(rewrite.apply("/something", None).as_deref(), Some("/"));
    assert_eq!(rewrite.apply("/something/", None).as_deref(), Some("/"));
    assert_eq!(
        rewrite.apply("/something/new", None).as_deref(),
        Some("/new")
    );
    assert_eq!(
        rewrite.apply("/SOMETHING/new", Some("a=1")).as_deref(),
        Some("/new?a=1")
    );
    assert_eq!(rewrite.apply("/other", None), None);
    let with_query = Rewrite {
        pattern: PathRegex::new("/app(.*)", false).unwrap(),
        target: "/v2$1?from=app".into(),
    };
    assert_eq!(
        with_query.apply("/app/x", Some("q=1")).as_deref(),
        Some("/v2/x?from=app&q=1")
    );
    // `$9` of a pattern without nine groups is empty; `$` alone stays.
    let odd = Rewrite {
        pattern: PathRegex::new("/(a)", false).unwrap(),
        target: "/$1$9$x".into(),
    };
    assert_eq!(odd.apply("/a", None).as_deref(), Some("/a$x"));
    assert!(PathRegex::new("/(?=look)", true).is_err());
}
