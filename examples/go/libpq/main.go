// Command libpq is a heartbeat handler for wsusage with database/sql and lib/pq.
//
// Run against a database with CREATE EXTENSION wsusage (Debian: golang-go and
// golang-github-lib-pq-dev, built in GOPATH mode):
//
//	GO111MODULE=off GOPATH=$HOME/go:/usr/share/gocode go build -o heartbeat ./examples/go/libpq
//	WSUSAGE_DSN='host=/tmp dbname=postgres user=app' WORKSPACE_IDS='9b2f…,0d41…' ./heartbeat
//
// It shows a prepared statement executed once per heartbeat (lib/pq sends the id as an untyped
// string, which the server resolves to uuid: no two wsusage functions of one name take the same
// number of arguments), and heartbeats batched into one wsusage_mark_many call (pq.Array of
// strings, resolved to uuid[]).
package main

import (
	"database/sql"
	"fmt"
	"log"
	"os"
	"strings"

	"github.com/lib/pq"
)

// heartbeat marks one workspace as used now.
func heartbeat(mark *sql.Stmt, workspaceID string) error {
	_, err := mark.Exec(workspaceID)
	return err
}

// heartbeatBatch marks many workspaces in one round trip.
func heartbeatBatch(db *sql.DB, workspaceIDs []string) error {
	_, err := db.Exec("SELECT wsusage_mark_many($1)", pq.Array(workspaceIDs))
	return err
}

func main() {
	db, err := sql.Open("postgres", os.Getenv("WSUSAGE_DSN"))
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	// Parsed and planned once per connection of the pool, then only executed.
	mark, err := db.Prepare("SELECT wsusage_mark($1)")
	if err != nil {
		log.Fatal(err)
	}
	defer mark.Close()

	var ids []string
	for _, id := range strings.Split(os.Getenv("WORKSPACE_IDS"), ",") {
		if id != "" {
			ids = append(ids, id)
		}
	}
	half := len(ids) / 2
	for _, id := range ids[:half] {
		if err := heartbeat(mark, id); err != nil {
			log.Fatal(err)
		}
	}
	for start := half; start < len(ids); start += 100 {
		end := start + 100
		if end > len(ids) {
			end = len(ids)
		}
		if err := heartbeatBatch(db, ids[start:end]); err != nil {
			log.Fatal(err)
		}
	}
	fmt.Printf("marked %d workspaces\n", len(ids))
}
