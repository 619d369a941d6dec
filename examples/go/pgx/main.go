// Command pgx is a heartbeat handler for wsusage with a jackc/pgx v4 connection pool.
//
// Run against a database with CREATE EXTENSION wsusage (Debian: golang-go and
// golang-github-jackc-pgx-v4-dev, built in GOPATH mode):
//
//	GO111MODULE=off GOPATH=$HOME/go:/usr/share/gocode go build -o heartbeat ./examples/go/pgx
//	WSUSAGE_DSN='host=/tmp dbname=postgres user=app' WORKSPACE_IDS='9b2f…,0d41…' ./heartbeat
//
// pgx prepares each statement once per connection and learns its parameter types from the
// server (uuid, uuid[]), so a heartbeat sends the id in binary; the strings here are encoded as
// uuid by pgtype, and a slice of them as uuid[] for one wsusage_mark_many call per batch. A
// service marks from many goroutines at once: the pool shares its connections among them.
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"strings"
	"sync"

	"github.com/jackc/pgx/v4/pgxpool"
)

// heartbeat marks one workspace as used now.
func heartbeat(ctx context.Context, pool *pgxpool.Pool, workspaceID string) error {
	_, err := pool.Exec(ctx, "SELECT wsusage_mark($1)", workspaceID)
	return err
}

// heartbeatBatch marks many workspaces in one round trip.
func heartbeatBatch(ctx context.Context, pool *pgxpool.Pool, workspaceIDs []string) error {
	_, err := pool.Exec(ctx, "SELECT wsusage_mark_many($1)", workspaceIDs)
	return err
}

func main() {
	ctx := context.Background()
	pool, err := pgxpool.Connect(ctx, os.Getenv("WSUSAGE_DSN"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	var ids []string
	for _, id := range strings.Split(os.Getenv("WORKSPACE_IDS"), ",") {
		if id != "" {
			ids = append(ids, id)
		}
	}
	half := len(ids) / 2
	// Heartbeats arrive concurrently: 8 goroutines share the pool.
	var wg sync.WaitGroup
	errs := make(chan error, half)
	for worker := 0; worker < 8; worker++ {
		wg.Add(1)
		go func(worker int) {
			defer wg.Done()
			for i := worker; i < half; i += 8 {
				if err := heartbeat(ctx, pool, ids[i]); err != nil {
					errs <- err
					return
				}
			}
		}(worker)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		log.Fatal(err)
	}
	for start := half; start < len(ids); start += 100 {
		end := start + 100
		if end > len(ids) {
			end = len(ids)
		}
		if err := heartbeatBatch(ctx, pool, ids[start:end]); err != nil {
			log.Fatal(err)
		}
	}
	fmt.Printf("marked %d workspaces\n", len(ids))
}
