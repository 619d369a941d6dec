//! Rows for the columns the caller's SQL declares, matched by name: how the set-returning
//! functions of `monitoring` stay safe across versions.
//!
//! Between the restart that loads a new library and `ALTER EXTENSION wsusage UPDATE`, the
//! database still holds the old release's declarations: `wsusage_stats()` of 0.1.0 declares 16
//! columns, while 0.2.0's library knows 19. A function that fills the columns it was compiled
//! with would hand PostgreSQL datums it reads as other types (an integer read as a pointer
//! crashed the server). pg_stat_statements solves this with one C entry point per API version;
//! here one entry point reads the declaration instead (`get_call_result_type`, the function's
//! OUT parameters as the database has them) and fills each declared column by its name, so
//! every released declaration works against every later library. A column this library does not
//! know, or declared with another type, is an ERROR naming it, with a hint to update the
//! extension; never a wrong datum.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgTupleDesc};

/// A column a function can fill.
pub struct Column {
    pub name: &'static str,
    pub type_oid: pg_sys::Oid,
}

/// One column's value in one row.
pub enum Value {
    Null,
    Int8(i64),
    Int4(i32),
    Oid(pg_sys::Oid),
    Text(String),
    /// `TimestampTz`: microseconds since 2000-01-01.
    Timestamptz(i64),
    /// An interval of microseconds.
    Interval(i64),
    Uuid([u8; 16]),
}

impl Value {
    /// The value as a datum of the column's type (checked against the declaration beforehand),
    /// allocated in the current memory context when passed by reference.
    ///
    /// # Safety
    /// Inside a function call, in a memory context that outlives the result set.
    unsafe fn into_datum(self) -> Option<pg_sys::Datum> {
        // SAFETY: the caller's promise; each datum has the layout its type expects.
        unsafe {
            Some(match self {
                Value::Null => return None,
                Value::Int8(v) => pg_sys::Datum::from(v),
                Value::Int4(v) => pg_sys::Datum::from(v),
                Value::Oid(v) => pg_sys::Datum::from(v),
                Value::Text(v) => {
                    pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(v.as_ptr().cast(), v.len() as _))
                }
                Value::Timestamptz(v) => pg_sys::Datum::from(v),
                Value::Interval(micros) => {
                    let interval = pg_sys::palloc0(size_of::<pg_sys::Interval>()).cast::<pg_sys::Interval>();
                    (*interval).time = micros;
                    pg_sys::Datum::from(interval)
                }
                Value::Uuid(bytes) => {
                    let uuid = pg_sys::palloc(16).cast::<u8>();
                    uuid.copy_from_nonoverlapping(bytes.as_ptr(), 16);
                    pg_sys::Datum::from(uuid)
                }
            })
        }
    }
}

fn raise(code: PgSqlErrorCode, message: String, function: &'static str) -> ! {
    ErrorReport::new(code, message, function)
        .set_hint("Run ALTER EXTENSION wsusage UPDATE to install the SQL of the loaded library's version.")
        .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// Return `rows` from the set-returning function called with `fcinfo`, in materialize mode, each
/// declared column filled by `value(row, name)`, `name` being one of `columns` (in groups, in no
/// particular order).
///
/// # Safety
/// `fcinfo` is the call's, in a function declared to return a set of a composite type.
pub unsafe fn materialize<R>(
    fcinfo: pg_sys::FunctionCallInfo,
    function: &'static str,
    columns: &[&[Column]],
    rows: impl IntoIterator<Item = R>,
    value: impl Fn(&R, &str) -> Value,
) -> pg_sys::Datum {
    // SAFETY: the caller's promise: a live call, whose resultinfo PostgreSQL set up; the
    // tuplestore and descriptor live in the per-query context the executor reads them from.
    unsafe {
        let rsinfo = (*fcinfo).resultinfo.cast::<pg_sys::ReturnSetInfo>();
        if rsinfo.is_null()
            || (*rsinfo).type_ != pg_sys::NodeTag::T_ReturnSetInfo
            || (*rsinfo).allowedModes & pg_sys::SetFunctionReturnMode::SFRM_Materialize as i32 == 0
        {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "set-valued function called in context that cannot accept a set",
                function,
            )
            .report(PgLogLevel::ERROR);
        }
        let mut declared: pg_sys::TupleDesc = std::ptr::null_mut();
        if pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut declared)
            != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE
        {
            raise(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!("{function}() is not declared with the named columns the loaded wsusage library returns"),
                function,
            );
        }

        // Which of our columns each declared one is; None for a dropped one.
        let attributes = PgTupleDesc::from_pg_unchecked(declared);
        let natts = attributes.len();
        let mut sources: Vec<Option<&Column>> = Vec::with_capacity(natts);
        for attribute in attributes.iter() {
            if attribute.attisdropped {
                sources.push(None);
                continue;
            }
            let name = CStr::from_ptr(attribute.attname.data.as_ptr()).to_string_lossy();
            let Some(column) = columns.iter().flat_map(|group| group.iter()).find(|column| column.name == name) else {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                    format!("{function}() is declared with a column \"{name}\" that the loaded wsusage library does not return"),
                    function,
                );
            };
            if attribute.atttypid != column.type_oid {
                raise(
                    PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                    format!(
                        "{function}() declares column \"{name}\" with type OID {}, but the loaded wsusage library returns type OID {}",
                        attribute.atttypid.to_u32(),
                        column.type_oid.to_u32()
                    ),
                    function,
                );
            }
            sources.push(Some(column));
        }

        let caller_context = pg_sys::MemoryContextSwitchTo((*(*rsinfo).econtext).ecxt_per_query_memory);
        let store = pg_sys::tuplestore_begin_heap(true, false, pg_sys::work_mem);
        let descriptor = pg_sys::CreateTupleDescCopy(declared);
        (*rsinfo).returnMode = pg_sys::SetFunctionReturnMode::SFRM_Materialize;
        (*rsinfo).setResult = store;
        (*rsinfo).setDesc = descriptor;
        let mut datums = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        for row in rows {
            for (attribute, source) in sources.iter().enumerate() {
                let datum = source.and_then(|column| value(&row, column.name).into_datum());
                nulls[attribute] = datum.is_none();
                datums[attribute] = datum.unwrap_or(pg_sys::Datum::from(0));
            }
            pg_sys::tuplestore_putvalues(store, descriptor, datums.as_mut_ptr(), nulls.as_mut_ptr());
        }
        pg_sys::MemoryContextSwitchTo(caller_context);
        pg_sys::Datum::from(0)
    }
}
