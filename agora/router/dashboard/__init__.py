"""The gateway's live dashboard: ``GET /dashboard`` (a page), its feed, and ``agora top``.

::

    GET  /dashboard              the page (static: no data in it, no CDN, no build step)
    GET  /dashboard/static/NAME  its script and style sheet
    POST /dashboard/login        an admin key (Authorization) -> an HttpOnly session cookie
    POST /dashboard/logout
    GET  /dashboard/snapshot     one snapshot as JSON          (admin: a key, or the session cookie)
    GET  /dashboard/events       server-sent events, a snapshot every interval (``?interval=S``, >= 0.25 s)

With keys configured, only an admin key (or the cookie a login with one gave) sees the data; on a
gateway with no keys, as for the admin API, only clients on this machine do.
"""

from agora.router.dashboard.feed import Dashboard

__all__ = ["Dashboard"]
